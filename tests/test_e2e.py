"""The whole pipeline through `make run`'s `dvc repro`, in a temporary copy of the repository, on the
`ci` profile (the `pipeline` fixture: tests/e2e_pipeline.py)."""
import json
import math
import shutil
import sys

import pytest

from checks import check_champions_predict_with_their_recorded_scores, check_classification_method_recorded
from conftest import REPO
from e2e_pipeline import sh

pytestmark = pytest.mark.e2e


def client_for(root):
    from mlflow.tracking import MlflowClient
    return MlflowClient(f"sqlite:///{root}/mlflow.db")


def test_metrics_file_holds_roles_and_claim(pipeline):
    import yaml
    root, _, _ = pipeline
    for method in ("hinton_kd", "fitnet_hint"):
        rep = json.loads((root / "metrics" / f"{method}.json").read_text())
        assert set(rep["roles"]) == {"teacher", "student_kd", "student_labels"}
        seeds = yaml.safe_load((root / "params.yaml").read_text())["methods"][method]["seeds"]
        assert rep["roles"]["student_kd"]["n"] == len(seeds) and rep["roles"]["teacher"]["mean"] > 0.9
        c = rep["claim"]
        assert c["statement"] == "student_kd.accuracy > student_labels.accuracy"
        (part,) = c["parts"]
        assert c["verdict"] == part["verdict"] in ("holds", "refuted", "inconclusive")
        assert part["seeds"] == seeds and len(part["differences"]) == len(seeds)  # paired by seed
        assert part["diff_mean"] == pytest.approx(part["left"]["mean"] - part["right"]["mean"])
        lo, hi = part["ci95"]
        assert lo <= part["diff_mean"] <= hi
        assert part["verdict"] == ("holds" if lo > 0 else "refuted" if hi <= 0 else "inconclusive")
        assert part["left"]["mean"] == rep["roles"]["student_kd"]["mean"]


def test_mlflow_runs_carry_metrics_plots_models_lineage_and_champions(pipeline):
    import yaml
    from tasks.kinds.classification.schema import load_splits
    from tasks.platform.common import hash_path
    root, env, _ = pipeline
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    lineage = {"git_commit": sh(["git", "rev-parse", "HEAD"], root, env).stdout.strip(),
               "data_sha256": hash_path(root / "data" / "digits"),
               "dvc_lock_md5": lock["stages"]["digits"]["outs"][0]["md5"]}
    report = check_classification_method_recorded(client_for(root), root, "hinton_kd", lineage)
    assert report == json.loads((root / "metrics" / "hinton_kd.json").read_text())
    test = load_splits(root / "data" / "digits", validate=False)["test"]
    check_champions_predict_with_their_recorded_scores(f"sqlite:///{root}/mlflow.db", "hinton_kd", test)


def test_second_repro_is_a_noop_and_a_param_change_reruns_one_method_reusing_its_teacher(pipeline):
    root, env, first = pipeline
    assert "Running stage 'train@hinton_kd'" in first.stdout
    n_runs = len(client_for(root).search_runs([client_for(root).get_experiment_by_name("hinton_kd").experiment_id]))
    again = sh(["dvc", "repro"], root, env)
    assert "Running stage" not in again.stdout and "Data and pipelines are up to date" in again.stdout
    assert len(client_for(root).search_runs(
        [client_for(root).get_experiment_by_name("hinton_kd").experiment_id])) == n_runs

    params = root / "params.yaml"
    original = params.read_text()
    before = json.loads((root / "metrics" / "fitnet_hint.json").read_text())
    try:
        seeds = original.index("    seeds: [0, 1, 2, 3, 4]", original.index("  fitnet_hint:\n"))
        edited = original[:seeds] + original[seeds:].replace("[0, 1, 2, 3, 4]", "[0, 1, 2, 3, 5]", 1)
        params.write_text(edited)
        assert set(json.loads(sh(["dvc", "status", "--json"], root, env).stdout)) == {"train@fitnet_hint"}
        rerun = sh(["dvc", "repro"], root, env)
        assert "Running stage 'train@fitnet_hint'" in rerun.stdout
        assert "Running stage 'train@hinton_kd'" not in rerun.stdout and "Running stage 'digits'" not in rerun.stdout
        after = json.loads((root / "metrics" / "fitnet_hint.json").read_text())
        # the teacher's inputs did not change: Prefect's cache returns the same teacher run
        assert after["mlflow"]["runs"]["teacher/seed0"] == before["mlflow"]["runs"]["teacher/seed0"]
        assert after["mlflow"]["runs"]["student_kd/seed5"] not in before["mlflow"]["runs"].values()
    finally:
        params.write_text(original)
        sh(["dvc", "repro"], root, env)  # back to the committed seeds (cached trainings): later tests start clean
    assert stale_stages(root, env) == set()


def test_flow_on_bad_input_fails_clearly_and_writes_nothing(pipeline):
    root, env, _ = pipeline
    bad = root / "data_bad"
    shutil.copytree(root / "data" / "digits", bad)
    (bad / "test.parquet").write_bytes(b"truncated")
    params = root / "params_bad.yaml"
    params.write_text((root / "params.yaml").read_text().replace("data: data/digits", "data: data_bad"))
    proc = sh([sys.executable, "-m", "flows.method", "hinton_kd", "--params", "params_bad.yaml",
               "--report", "metrics/bad.json"], root, env, check=False)
    assert proc.returncode == 1
    assert "error: data_bad/test.parquet: not a readable Parquet file" in proc.stderr
    assert not (root / "metrics" / "bad.json").exists()


def test_era5_stages_write_both_profiles(pipeline):
    from tasks.kinds.forecast.schema import load_prepared
    root, _, _ = pipeline
    default = load_prepared(root / "data/era5/default/prepared")
    assert dict(default["train"].sizes)["latitude"] == 16 and dict(default["train"].sizes)["longitude"] == 32
    if (REPO.parent / "shared").is_dir():
        samples = load_prepared(root / "data/era5/samples/prepared")
        assert list(samples["train"].data_vars) == ["t2m"]
        assert samples["meta"]["source"] == "files"


def test_forecast_methods_report_claims_runs_plots_and_a_loadable_champion(pipeline):
    import mlflow
    import torch
    from tasks.kinds.forecast.data import load_forecast_data
    root, _, _ = pipeline
    client = client_for(root)
    expected_roles = {"pangu": {"teacher", "persistence", "climatology"},
                      "pangu_hta": {"teacher", "iterated_1h"},
                      "pangu_student": {"teacher", "student_kd", "student_labels"}}
    if (REPO.parent / "shared").is_dir():  # the real-samples method (surface only, regional grid)
        expected_roles["pangu_uk_t2m"] = {"teacher", "persistence", "climatology"}
        expected_roles["pangu_eda_upper"] = {"teacher", "persistence", "climatology"}
    for method, roles in expected_roles.items():
        rep = json.loads((root / "metrics" / f"{method}.json").read_text())
        assert set(rep["roles"]) == roles
        parts = rep["claim"]["parts"]
        for p in parts:  # "<" claims: the interval of left - right in the claimed direction
            if p["ci95"] is None:
                assert p["verdict"] == "inconclusive" and len(p["differences"]) == 1
            else:
                lo, hi = p["ci95"]
                assert p["verdict"] == ("holds" if hi < 0 else "refuted" if lo >= 0 else "inconclusive")
        verdicts = {p["verdict"] for p in parts}
        assert rep["claim"]["verdict"] == ("holds" if verdicts == {"holds"} else
                                           "refuted" if "refuted" in verdicts else "inconclusive")
        exp = client.get_experiment_by_name(method)
        parent = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags["distillery.role"] == "flow"][0]
        assert parent.data.tags["distillery.claim_verdict"] == rep["claim"]["verdict"]
        assert parent.data.tags[f"distillery.claim.{len(parts) - 1}"].endswith(parts[-1]["verdict"])
        artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert "rmse_vs_lead.png" in artifacts and "maps" in artifacts
    assert len(json.loads((root / "metrics" / "pangu.json").read_text())["claim"]["parts"]) == 12
    # surface-only and upper-air-only data train on the one field they have: finite losses, not NaN
    for method in set(expected_roles) & {"pangu_uk_t2m", "pangu_eda_upper"}:
        exp = client.get_experiment_by_name(method)
        teacher_runs = client.search_runs([exp.experiment_id], "tags.`distillery.role` = 'teacher'")
        lead_runs = [r for r in teacher_runs if "val_loss" in r.data.metrics]
        assert lead_runs and all(math.isfinite(r.data.metrics[k]) for r in lead_runs for k in ("train_loss", "val_loss"))

    student_runs = client.search_runs([client.get_experiment_by_name("pangu_student").experiment_id],
                                      "tags.`distillery.role` = 'student_kd'")
    kd = [r for r in student_runs if "loss.hint.weight" in r.data.params]  # the unit (lead-time) runs
    assert len(kd) == 3 and all(r.data.tags["distillery.teacher_model_version"] == "pangu_student_teacher/1" for r in kd)

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    forecaster = mlflow.pytorch.load_model("models:/pangu@champion")
    data = load_forecast_data(str(root / "data/era5/default/prepared"))
    with torch.no_grad():
        u, s = forecaster(data.test.upper[:2], data.test.surface[:2], 24)
    assert u.shape == data.test.upper[:2].shape and torch.isfinite(u).all() and torch.isfinite(s).all()


def test_video_stages_and_localization_methods_report_claims_figures_and_a_champion(pipeline):
    """Issue 12 end to end: generated mp4s -> pretrained extractors -> snippet features -> the three
    WTAL methods, each with its claim over seeds, figures, and a champion that localizes."""
    import mlflow
    import torch
    from tasks.kinds.localization.schema import load_localization
    root, _, _ = pipeline
    client = client_for(root)
    data = load_localization(root / "data/video/default/features")
    assert data.num_classes >= 4 and {k: len(v) for k, v in data.splits.items()}["test"] > 0
    assert len(list((root / "data/video/default/videos").rglob("*.mp4"))) >= len(data.splits["train"])
    roles = {"wtal_cbp": {"teacher"}, "wtal_vlp": {"teacher"},
             "wtal_dcc": {"teacher", "student_kd", "student_labels"}}
    for method, expected in roles.items():
        rep = json.loads((root / "metrics" / f"{method}.json").read_text())
        assert set(rep["roles"]) == expected
        assert rep["claim"]["verdict"] in ("holds", "refuted", "inconclusive")
        for part in rep["claim"]["parts"]:
            assert len(part["differences"]) == 5 and part["ci95"] is not None
        parent = [r for r in client.search_runs([client.get_experiment_by_name(method).experiment_id])
                  if r.data.tags["distillery.role"] == "flow"][0]
        assert {"ap_per_class.png", "timelines.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    kd = client.search_runs([client.get_experiment_by_name("wtal_dcc").experiment_id],
                            "tags.`distillery.role` = 'student_kd'")
    assert len(kd) == 5 and all(0 <= r.data.metrics["test_mAP"] <= 1 for r in kd)
    assert all({"test_cbp_mAP", "test_vlp_mAP", "test_cbp_len_ratio", "test_vlp_len_ratio"} <= set(r.data.metrics)
               for r in kd)

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    model = mlflow.pytorch.load_model("models:/wtal_dcc@champion").eval()
    test = data.splits["test"]
    with torch.no_grad():
        out = model({k: torch.from_numpy(v[:2]) for k, v in test.features.items()}
                    | {"mask": torch.from_numpy(test.mask[:2])})
    assert out["cas"].shape == (2, test.mask.shape[1], data.num_classes) and torch.isfinite(out["cas"]).all()


def test_pointcloud_stages_write_kitti_scenes_and_validated_voxels(pipeline):
    """Issue 13's data stages: ray-cast KITTI-format scenes -> voxels, readable through the contract."""
    import numpy as np
    from tasks.kinds.detection3d.io import read_kitti_frame
    from tasks.kinds.detection3d.schema import load_voxels
    root, _, _ = pipeline
    summary, frames = load_voxels(root / "data/pointcloud/default/voxels")
    real = [f for f in frames if summary["frames"][f.frame]["split"] == "real"]
    frames = [f for f in frames if f not in real]
    assert len(frames) == len(list((root / "data/pointcloud/default/scans").rglob("velodyne/*.bin"))) >= 100
    assert len(real) == 6 and all(f.frame.startswith("real_") for f in real)   # the real KITTI frames, scored only
    assert sum(len(f.boxes) for f in frames) > len(frames)  # several labelled objects per scene
    scans = root / "data/pointcloud/default/scans/training"
    kitti = read_kitti_frame(scans, frames[0].frame)  # the label files carry the voxelized frame's boxes
    assert np.allclose(kitti.boxes.boxes, frames[0].boxes) and kitti.boxes.names == list(frames[0].names)
    if (REPO.parent / "shared").is_dir():
        _, real = load_voxels(root / "data/pointcloud/samples/voxels")
        assert len(real) == 6


def test_detection_methods_share_the_teacher_report_claims_figures_and_a_champion(pipeline):
    """Issue 13 end to end: the voxels -> SECOND, SPS-Conv against it, and the distilled slim SPS
    detector, each claim over seeds; the three methods train SECOND once per seed between them."""
    import mlflow
    import torch
    from tasks.kinds.detection3d.kind import batch_inputs, load_detection
    root, _, _ = pipeline
    client = client_for(root)
    roles = {"second": {"teacher"}, "sps_conv": {"teacher", "student_labels"},
             "sps_student": {"teacher", "student_kd", "student_labels"}}
    reports = {m: json.loads((root / "metrics" / f"{m}.json").read_text()) for m in roles}
    for method, expected in roles.items():
        rep = reports[method]
        assert set(rep["roles"]) == expected
        assert rep["claim"]["verdict"] in ("holds", "refuted", "inconclusive")
        for part in rep["claim"]["parts"]:
            assert len(part["differences"]) == 3 and part["ci95"] is not None
        parent = [r for r in client.search_runs([client.get_experiment_by_name(method).experiment_id])
                  if r.data.tags["distillery.role"] == "flow"][0]
        artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
        assert {"bev_boxes.png", "pr_curves.png"} <= artifacts
        assert ("pruning_mask.png" in artifacts) == (method != "second")
    # SECOND's seed-s training is one run, whichever method asked for it first
    second_runs = reports["second"]["mlflow"]["runs"]
    for seed in (0, 1, 2):
        assert reports["sps_conv"]["mlflow"]["runs"][f"teacher/seed{seed}"] == second_runs[f"teacher/seed{seed}"]
    assert reports["sps_student"]["mlflow"]["runs"]["teacher/seed0"] == second_runs["teacher/seed0"]
    for rep in reports.values():   # scored on the real KITTI frames too
        assert {"real_car_bev_ap", "real_mAP_bev"} <= set(rep["scores"]["teacher"])
    (flops, *_) = reports["sps_conv"]["claim"]["parts"]
    assert flops["statement"] == "student_labels.backbone_gflops <= 0.6 * teacher.backbone_gflops"

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    data = load_detection(str(root / "data/pointcloud/default/voxels"))
    for name in ("second", "sps_conv", "sps_student"):
        model = mlflow.pytorch.load_model(f"models:/{name}@champion").eval()
        with torch.no_grad():
            out = model(batch_inputs(data.splits["test"].frames[:2]))
        assert out["heatmap"].shape == (2, 3, *data.bev.cells) and torch.isfinite(out["reg"]).all()


def test_terngrad_trains_both_roles_on_two_ranks_and_counts_the_bytes(pipeline):
    """Issue 14 end to end: both roles under torchrun (2 gloo ranks), one MLflow run each with its
    learning curve logged by rank 0, the bytes ratio counted by the hooks, the claim over seeds."""
    import yaml
    root, _, _ = pipeline
    params = yaml.safe_load((root / "params.yaml").read_text())["methods"]["terngrad"]
    rep = json.loads((root / "metrics" / "terngrad.json").read_text())
    assert set(rep["roles"]) == {"teacher", "student_labels"}
    accuracy, wire = rep["claim"]["parts"]
    assert accuracy["statement"] == "student_labels.accuracy >= teacher.accuracy - 0.02"
    assert wire["verdict"] == "holds" and wire["seeds"] == params["seeds"]
    client = client_for(root)
    exp = client.get_experiment_by_name("terngrad")
    runs = {r.data.tags["distillery.role"]: r for r in client.search_runs([exp.experiment_id], "tags.`distillery.seed` = '0'")}
    full, tern = runs["teacher"], runs["student_labels"]
    assert full.data.tags["distillery.comm_hook"] == "allreduce" and tern.data.tags["distillery.comm_hook"] == "terngrad"
    for run, side in ((full, "teacher"), (tern, "student")):
        assert run.data.tags["distillery.nproc"] == "2"
        assert len(client.get_metric_history(run.info.run_id, "val_accuracy")) == params[side]["epochs"]
        assert "learning_curve.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
    ratio = full.data.metrics["comm_bytes_per_step"] / tern.data.metrics["comm_bytes_per_step"]
    assert 15 < ratio < 16  # 32 bits against 2, less one float32 scale per layer


def stale_stages(root, env):
    return set(json.loads(sh(["dvc", "status", "--json"], root, env).stdout))


def test_adding_a_method_leaves_every_other_stage_up_to_date(pipeline):
    """A new method on an existing kind is one declaration file and one params block."""
    root, env, _ = pipeline
    params, declaration = root / "params.yaml", root / "tasks" / "methods" / "hinton_kd_t2.py"
    original = params.read_text()
    try:
        declaration.write_text((root / "tasks" / "methods" / "hinton_kd.py").read_text()
                               .replace('name="hinton_kd"', 'name="hinton_kd_t2"').replace('"temperature": 4.0', '"temperature": 2.0'))
        block = original[original.index("  hinton_kd:\n"):original.index("  fitnet_hint:\n")]
        params.write_text(original.replace("  fitnet_hint:\n", block.replace("  hinton_kd:", "  hinton_kd_t2:") + "  fitnet_hint:\n"))
        assert stale_stages(root, env) == {"train@hinton_kd_t2"}
    finally:
        params.write_text(original)
        declaration.unlink(missing_ok=True)
    assert stale_stages(root, env) == set()


def test_editing_the_weather_model_reruns_only_the_forecast_methods(pipeline):
    import yaml
    root, env, _ = pipeline
    model_file = root / "models" / "weather.py"
    original = model_file.read_text()
    try:
        model_file.write_text(original + "\n# an edit\n")
        forecast = {f"train@{m}" for m, p in yaml.safe_load((root / "params.yaml").read_text())["methods"].items()
                    if p["kind"] == "forecast"}
        assert stale_stages(root, env) == forecast  # hinton_kd and fitnet_hint stay cached
    finally:
        model_file.write_text(original)
    assert stale_stages(root, env) == set()
