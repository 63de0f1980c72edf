"""MLflow on an embedded SQLite store: runs always end, registration is idempotent, champion rules."""
import os

import pytest
import torch
from mlflow.tracking import MlflowClient

from tasks.platform import tracking


def logged_model(ctx, name="r"):
    with tracking.run(ctx, name) as run_id:
        uri = tracking.log_model(torch.nn.Linear(2, 2), torch.zeros(1, 2))
    return run_id, uri


def test_run_carries_lineage_and_fails_on_error(tracking_ctx):
    client = MlflowClient(tracking_ctx.tracking_uri)
    with pytest.raises(RuntimeError):
        with tracking.run(tracking_ctx, "x", tags={"role": "teacher"}, params={"a": {"b": 1}}) as run_id:
            raise RuntimeError("boom")
    r = client.get_run(run_id)
    assert r.info.status == "FAILED"
    assert r.data.tags["distillery.git_commit"] == "abc" and r.data.tags["distillery.role"] == "teacher"
    assert r.data.params["a.b"] == "1"


def test_parent_run_ends_killed_on_interrupt_and_children_nest(tracking_ctx):
    import dataclasses
    client = MlflowClient(tracking_ctx.tracking_uri)
    with pytest.raises(KeyboardInterrupt):
        with tracking.parent_run(tracking_ctx, "p") as parent:
            child_ctx = dataclasses.replace(tracking_ctx, parent_run_id=parent)
            with tracking.run(child_ctx, "c") as child:
                pass
            raise KeyboardInterrupt
    assert client.get_run(parent).info.status == "KILLED"
    assert client.get_run(child).info.status == "FINISHED"
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == parent


def test_register_is_idempotent_per_run(tracking_ctx):
    run_id, uri = logged_model(tracking_ctx)
    v1 = tracking.register_version("m", uri, run_id, tracking_ctx)
    assert tracking.register_version("m", uri, run_id, tracking_ctx) == v1
    run2, uri2 = logged_model(tracking_ctx)
    assert tracking.register_version("m", uri2, run2, tracking_ctx) == v1 + 1


@pytest.mark.parametrize("higher,scores,champions", [
    (True, [0.9, 0.8, 0.9, 0.95], [1, 1, 1, 4]),    # worse and tie keep the old champion
    (False, [2.0, 1.5, 1.5, 3.0], [1, 2, 2, 2]),    # lower is better (e.g. RMSE)
])
def test_champion_moves_only_to_a_strictly_better_version(tracking_ctx, higher, scores, champions):
    client = MlflowClient(tracking_ctx.tracking_uri)
    for score, expected in zip(scores, champions):
        run_id, uri = logged_model(tracking_ctx)
        version = tracking.register_version("m", uri, run_id, tracking_ctx)
        result = tracking.promote_if_better("m", version, score, higher, tracking_ctx)
        assert result["champion"] is (expected == version)
        assert int(client.get_model_version_by_alias("m", "champion").version) == expected


def test_champion_model_loads_and_predicts(tracking_ctx):
    import mlflow
    run_id, uri = logged_model(tracking_ctx)
    v = tracking.register_version("m", uri, run_id, tracking_ctx)
    tracking.promote_if_better("m", v, 1.0, True, tracking_ctx)
    model = mlflow.pytorch.load_model("models:/m@champion")
    assert model(torch.ones(3, 2)).shape == (3, 2)


def test_runs_whose_process_died_are_marked_killed_at_the_next_start(tracking_ctx):
    """A SIGKILLed flow leaves its runs RUNNING; the next experiment_context ends exactly those."""
    import socket
    import subprocess
    import sys
    from mlflow.tracking import MlflowClient
    from tasks.platform import tracking
    client = MlflowClient(tracking_ctx.tracking_uri)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owners = {"dead": f"{socket.gethostname()}:{dead.pid}:1.000",
              "reused pid": f"{socket.gethostname()}:{os.getpid()}:1.000",   # our pid, another start time
              "alive": tracking.owner(),
              "other host": f"not-{socket.gethostname()}:{dead.pid}:1.000"}
    ids = {}
    for name, tag in owners.items():
        ids[name] = client.create_run(tracking_ctx.experiment_id, run_name=name, tags={tracking.OWNER: tag}).info.run_id
    tracking.experiment_context("test-exp", {"tracking_uri": tracking_ctx.tracking_uri}, {})
    status = {name: client.get_run(i).info.status for name, i in ids.items()}
    assert status == {"dead": "KILLED", "reused pid": "KILLED", "alive": "RUNNING", "other host": "RUNNING"}
    assert "its process was gone" in client.get_run(ids["dead"]).data.tags["distillery.ended_by"]


def test_every_run_names_its_owner_process(tracking_ctx):
    from mlflow.tracking import MlflowClient
    from tasks.platform import tracking
    with tracking.run(tracking_ctx, "r") as run_id:
        pass
    assert MlflowClient(tracking_ctx.tracking_uri).get_run(run_id).data.tags[tracking.OWNER] == tracking.owner()


def test_champion_tag_moves_with_the_alias(tracking_ctx):
    """The run of the champion version says so (`distillery.champion`), and only while it is."""
    client = MlflowClient(tracking_ctx.tracking_uri)
    runs = []
    for score in (0.8, 0.9, 0.9):  # better, then a tie, which keeps the champion
        run_id, uri = logged_model(tracking_ctx)
        tracking.promote_if_better("m", tracking.register_version("m", uri, run_id, tracking_ctx), score, True,
                                   tracking_ctx)
        runs.append(run_id)
    tags = [client.get_run(r).data.tags.get(tracking.CHAMPION_TAG) for r in runs]
    assert tags == [None, "m@champion", None]
    # a run registered under two names (a teacher methods share) is the champion of both
    tracking.promote_if_better("other", tracking.register_version("other", "runs:/x/model", runs[1], tracking_ctx),
                               1.0, True, tracking_ctx)
    assert client.get_run(runs[1]).data.tags[tracking.CHAMPION_TAG] == "m@champion, other@champion"


def test_runs_and_the_experiment_carry_what_the_mlflow_ui_shows(tracking_ctx):
    import json
    client = MlflowClient(tracking_ctx.tracking_uri)
    experiment = client.get_experiment(tracking_ctx.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    with tracking.parent_run(tracking_ctx, "p", description="**flow**") as parent:
        pass
    tags = client.get_run(parent).data.tags
    assert tags[tracking.NOTE] == "**flow**"
    assert tags["mlflow.source.name"] and tags["mlflow.user"]  # as the fluent API's runs have them
    with tracking.run(tracking_ctx, "c", description="child") as child:
        pass
    tracking.annotate_run(child, tracking_ctx, name="kd s0", description="new", tags={"claim_verdict": "holds"})
    r = client.get_run(child)
    assert r.info.run_name == "kd s0" and r.data.tags[tracking.NOTE] == "new"
    assert r.data.tags["distillery.claim_verdict"] == "holds"

    tracking.describe_experiment(tracking_ctx, "about", primary_metric="score")
    tracking.save_view(tracking_ctx, "v", "a view", {"orderByKey": "metrics.`score`"})
    first = json.loads(client.get_experiment(tracking_ctx.experiment_id).tags[f"{tracking.SAVED_VIEW}v"])
    tracking.save_view(tracking_ctx, "v", "a view", {"orderByKey": "metrics.`score`", "orderByAsc": True})
    tags = client.get_experiment(tracking_ctx.experiment_id).tags
    view = json.loads(tags[f"{tracking.SAVED_VIEW}v"])
    assert view["createdAt"] == first["createdAt"] and json.loads(view["state"])["orderByAsc"] is True
    assert tags[tracking.NOTE] == "about" and tags[tracking.PRIMARY_METRIC] == "score"


def test_run_names_read_in_a_narrow_column_and_runs_say_how_they_were_started(monkeypatch):
    from tasks.steps.annotate import parent_name, run_name, run_source
    assert [run_name("teacher", 0), run_name("student_kd", 1), run_name("student_labels", 2)] == \
        ["teacher s0", "kd s1", "labels s2"]
    assert run_name("teacher", 0, "24h") == "teacher 24h s0"
    assert run_name("teacher", 0, composed=True) == "teacher s0 composed"
    assert parent_name("hinton_kd", "holds") == "holds · hinton_kd" and parent_name("hinton_kd") == "hinton_kd"
    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert run_source() == {"source": "cli", "entry_point": "python -m flows.method"}
    assert run_source("method/hinton-kd") == {"source": "prefect-deployment", "entry_point": "method/hinton-kd"}
    monkeypatch.setenv("DVC_STAGE", "train@hinton_kd")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert run_source() == {"source": "dvc", "entry_point": "dvc repro train@hinton_kd"}


def test_the_claim_step_puts_the_verdict_and_results_on_every_run_of_the_flow(tracking_ctx):
    """annotate_flow on runs laid out as the flow lays them out (no training: tiny logged models)."""
    import dataclasses
    from tasks.methods import get_method
    from tasks.steps.annotate import annotate_flow, training_description
    from tasks.steps.train_role import TrainedModel
    spec = get_method("hinton_kd")
    client = MlflowClient(tracking_ctx.tracking_uri)
    scores = {("teacher", 0): 0.97, ("student_kd", 0): 0.8, ("student_labels", 0): 0.7}
    with tracking.parent_run(tracking_ctx, "hinton_kd") as parent:
        ctx = dataclasses.replace(tracking_ctx, parent_run_id=parent)
        trained = []
        for role, seed in scores:
            with tracking.run(ctx, role, tags={"role": role, "seed": seed},
                              description=training_description(role, seed, "", "m", 10, ctx)) as run_id:
                uri = tracking.log_model(torch.nn.Linear(2, 2), None)
            trained.append(TrainedModel(role, seed, run_id, uri, 0.5))
        by_role = {t.role: t for t in trained}
        kd = by_role["student_kd"]
        version = tracking.register_version("hinton_kd", kd.model_uri, kd.run_id, ctx)
        evaluations = [{"role": t.role, "seed": t.seed, "run_id": t.run_id,
                        "metrics": {"accuracy": scores[(t.role, t.seed)]}} for t in trained]
        part = {"statement": spec.claims[0].statement, "verdict": "inconclusive", "diff_mean": 0.1, "ci95": None,
                "seeds": [0]}
        verdict = {"statement": part["statement"], "verdict": "inconclusive", "parts": [part]}
        for _ in range(2):  # a cached rerun annotates the same runs again: one result on top, not two
            assert sorted(annotate_flow(spec, trained, evaluations, verdict, ctx)) == sorted(t.run_id for t in trained)
    kd = client.get_run(by_role["student_kd"].run_id)
    note = kd.data.tags[tracking.NOTE]
    assert note.count("**Result**") == 1 and note.index("**Result**") == 0 and "**0.8**" in note
    assert tracking.model_version_link("hinton_kd", version) in note and "**kd s0**" in note
    assert kd.data.tags["distillery.claim_verdict"] == "inconclusive"
    assert kd.data.tags["distillery.claim_run_id"] == parent
    p = client.get_run(parent)
    assert p.info.run_name == "inconclusive · hinton_kd"
    assert all(tracking.run_link(ctx.experiment_id, t.run_id) in p.data.tags[tracking.NOTE] for t in trained)
