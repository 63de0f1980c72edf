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
    return report


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
