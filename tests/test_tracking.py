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
