"""What a finished method flow must have left in its MLflow store, whichever store it is: the embedded
SQLite of the e2e test or an MLflow server on PostgreSQL (tests/test_servers.py)."""
import json
from pathlib import Path

import pytest
import yaml


def runs_by_role(client, method):
    exp = client.get_experiment_by_name(method)
    by_role = {}
    for r in client.search_runs([exp.experiment_id]):
        by_role.setdefault(r.data.tags["distillery.role"], []).append(r)
    return by_role


def check_classification_method_recorded(client, root, method, lineage):
    """Runs (one parent, a teacher, n students of each kind), their metrics, plots and lineage tags,
    the registry's versions and `champion` aliases, and the report logged beside the parent run.

    `lineage` holds what every run's tags must say: git_commit, data_sha256, dvc_lock_md5."""
    params = yaml.safe_load((root / "params.yaml").read_text())["methods"][method]
    n = len(params["seeds"])
    by_role = runs_by_role(client, method)
    assert {k: len(v) for k, v in by_role.items()} == {"flow": 1, "teacher": 1, "student_kd": n, "student_labels": n}
    parent_id = by_role["flow"][0].info.run_id
    teacher_id = by_role["teacher"][0].info.run_id
    for r in (run for runs in by_role.values() for run in runs):
        t = r.data.tags
        assert r.info.status == "FINISHED"
        assert t["distillery.git_commit"] == lineage["git_commit"] and t["distillery.git_dirty"] == "false"
        assert t["distillery.data_sha256"] == lineage["data_sha256"]
        assert t["distillery.dvc_lock_md5"] == lineage["dvc_lock_md5"]
        if t["distillery.role"] == "flow":
            continue
        assert t["mlflow.parentRunId"] == parent_id
        epochs = params["teacher" if t["distillery.role"] == "teacher" else "student"]["epochs"]
        assert len(client.get_metric_history(r.info.run_id, "val_accuracy")) == epochs
        assert r.data.params["train.epochs"] == str(epochs) and "seed" in r.data.params
        assert "test_accuracy" in r.data.metrics
        assert "learning_curve.png" in [a.path for a in client.list_artifacts(r.info.run_id)]
    for r in by_role["student_kd"]:
        assert r.data.tags["distillery.teacher_run_id"] == teacher_id
        assert r.data.tags["distillery.teacher_model_version"] == f"{method}_teacher/1"
        assert r.data.params["loss.kd.temperature"] == "4.0"

    parent = by_role["flow"][0]
    (root / "downloads").mkdir(exist_ok=True)
    report = json.loads(Path(client.download_artifacts(parent_id, "report.json", str(root / "downloads"))).read_text())
    assert parent.data.tags["distillery.claim_verdict"] == report["claim"]["verdict"]
    assert parent.data.metrics["claim_holds"] == float(report["claim"]["verdict"] == "holds")
    part = report["claim"]["parts"][0]
    assert parent.data.metrics["claim.0.diff_mean"] == pytest.approx(part["diff_mean"])
    assert [parent.data.metrics["claim.0.ci95_low"], parent.data.metrics["claim.0.ci95_high"]] == pytest.approx(part["ci95"])
    assert report["mlflow"]["parent_run_id"] == parent_id

    student = client.get_model_version_by_alias(method, "champion")
    assert student.tags["distillery.teacher_model"] == f"{method}_teacher/1"
    assert student.tags["distillery.claim_verdict"] in ("holds", "refuted", "inconclusive")
    assert student.run_id in {r.info.run_id for r in by_role["student_kd"]}
    teacher = client.get_model_version_by_alias(f"{method}_teacher", "champion")
    assert teacher.run_id == teacher_id
    check_mlflow_view(client, method, by_role, report["claim"]["verdict"], {student.run_id: method,
                                                                          teacher.run_id: f"{method}_teacher"})
    return report


def check_mlflow_view(client, method, by_role, verdict, champions):
    """What the MLflow UI shows of the flow (tasks/steps/annotate.py): every run tagged with its method,
    kind, role, seed, source and the verdict, named for a narrow column and described; every scored
    run's `score`; the champions' runs tagged; the experiment and the versions described.
    `champions`: run id -> the registered model whose champion it is."""
    exp = client.get_experiment_by_name(method)
    assert method in exp.tags["mlflow.note.content"] and "Latest verdict" in exp.tags["mlflow.note.content"]
    assert "mlflow.sharedViewState.distillery-roles" in exp.tags
    for role, runs in by_role.items():
        for r in runs:
            t, seed = r.data.tags, r.data.tags["distillery.seed"]
            assert t["distillery.method"] == method and t["distillery.kind"] == "classification"
            assert t["distillery.claim_verdict"] == verdict
            assert t["distillery.source"] in ("dvc", "prefect-deployment", "cli") and t["distillery.entry_point"]
            assert t["mlflow.note.content"]
            if role == "flow":
                assert r.info.run_name == f"{verdict} · {method}"
                continue
            assert r.info.run_name == {"teacher": f"teacher s{seed}", "student_kd": f"kd s{seed}",
                                       "student_labels": f"labels s{seed}"}[role]
            assert r.data.metrics["score"] == r.data.metrics["test_accuracy"]
            assert t["distillery.score_metric"] == "test_accuracy"
            assert t["distillery.reproduce_tolerance"] == "1e-06"
            assert t["distillery.claim_run_id"] == by_role["flow"][0].info.run_id
            # a list: a teacher that methods share is the champion of each method's teacher model
            entries = t.get("distillery.champion", "").split(", ")
            if r.info.run_id in champions:
                assert f"{champions[r.info.run_id]}@champion" in entries
            else:
                assert not {f"{name}@champion" for name in champions.values()} & set(entries)
            assert "train_loss_kd" not in r.data.metrics or role == "student_kd"
    for name in set(champions.values()):
        assert client.get_model_version_by_alias(name, "champion").description


def check_champions_predict_with_their_recorded_scores(tracking_uri, method, test_split):
    """The `champion` of the student and of the teacher load through MLflow and score, on the test
    split, exactly what their version's `distillery.score` tag says."""
    import mlflow
    from mlflow.tracking import MlflowClient
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    for name in (method, f"{method}_teacher"):
        mv = client.get_model_version_by_alias(name, "champion")
        model = mlflow.pytorch.load_model(f"models:/{name}@champion")
        acc = int((model(test_split.x).argmax(-1) == test_split.y).sum()) / len(test_split.y)
        assert acc == pytest.approx(float(mv.tags["distillery.score"]), abs=1e-9)
