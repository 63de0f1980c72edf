"""How a flow runs when started from the command line (DVC, make, benchmarks)."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from tasks.platform.common import StageError

# MLflow draws a progress bar for every artifact download, i.e. every model a flow loads back
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@contextlib.contextmanager
def local_run_settings() -> Iterator[None]:
    """On Prefect's ephemeral API (no PREFECT_API_URL), switch off flow-run heartbeats.

    Heartbeats let a persistent server notice a crashed run; the ephemeral server dies with this
    process, so they buy nothing here, while Prefect 3.8 waits for the heartbeat thread's 1 s sleep
    when every flow run ends (~1 s of a 1.1 s empty flow, see benchmarks/orchestration.py). The same
    holds for the server `flows.repro` runs for one `dvc repro` (DISTILLERY_LOCAL_PREFECT). Against a
    shared server (PREFECT_API_URL set, e.g. a worker running a deployment) they stay on.
    """
    if os.environ.get("PREFECT_API_URL") and not os.environ.get("DISTILLERY_LOCAL_PREFECT"):
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield


def in_deployment() -> bool:
    """Whether this flow run was started from a deployment (by a worker), not from the command line."""
    from prefect.runtime import deployment
    return deployment.id is not None


def tracking_problems(env: dict[str, str]) -> list[str]:
    """What is wrong with a deployment's tracking store setting (it must outlive the run's clone)."""
    uri = env.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        return ["MLFLOW_TRACKING_URI is not set: the shared MLflow server (e.g. http://mlflow.internal:5000); "
                "without it runs would go to an SQLite file inside the run's temporary clone and be lost"]
    if not uri.startswith(("http://", "https://")):
        return [f"MLFLOW_TRACKING_URI must name a tracking server (http:// or https://), got "
                f"{uri.partition('://')[0]}://…: a database URI keeps the artifacts in the run's temporary clone"]
    return []


def deployment_settings(params: Any) -> dict[str, Any]:
    """The tracking params for a run, checked for a deployment: its clone is deleted after the run,
    so its store must be a tracking server named by MLFLOW_TRACKING_URI (see flows/worker.py)."""
    tracking = params.tracking.model_dump()
    if in_deployment():
        problems = tracking_problems(dict(os.environ))
        if problems:
            raise StageError("worker environment", "; ".join(problems))
    return tracking
