import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"  # the real samples: beside the checkout, here and in CI
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from checkout import copy_checkout  # noqa: E402,F401  (the e2e test's copy; the kill trials' too)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture
def tracking_ctx(tmp_path, monkeypatch):
    """A RunContext on a fresh SQLite store in tmp_path (no server)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from tasks.platform import tracking
    params = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_root": str(tmp_path / "art")}
    return tracking.experiment_context("test-exp", params, {"git_commit": "abc"})


def shared_file(rel: str) -> Path:
    """A sample from shared/data; missing is a failure in CI and a skip elsewhere."""
    path = SHARED / rel
    if not path.is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"shared sample missing: {path}")
        pytest.skip(f"shared sample missing: {path}")
    return path


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """(root, env, first `dvc repro`) of the whole pipeline in a temporary copy (tests/e2e_pipeline.py)."""
    from e2e_pipeline import run_pipeline
    return run_pipeline(tmp_path_factory)


@pytest.fixture(scope="session", autouse=True)
def stop_prefect_temporary_servers():
    """Flows run in this process start Prefect's temporary API server, which stops itself at exit and
    logs so to a stream pytest has closed by then (a '--- Logging error ---' after the summary). Stop
    it while the session's streams are still open."""
    yield
    server = sys.modules.get("prefect.server.api.server")
    if server is not None:
        from prefect.logging.handlers import APILogWorker
        APILogWorker.drain_all(timeout=5)  # the flows' last logs, while the server still takes them
        for instance in list(server.SubprocessASGIServer._instances.values()):
            instance.stop()
