"""How a flow runs when started from the command line (DVC, make, benchmarks)."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def local_run_settings() -> Iterator[None]:
    """On Prefect's ephemeral API (no PREFECT_API_URL), switch off flow-run heartbeats.

    Heartbeats let a persistent server notice a crashed run; the ephemeral server dies with this
    process, so they buy nothing here, while Prefect 3.8 waits for the heartbeat thread's 1 s sleep
    when every flow run ends (~1 s of a 1.1 s empty flow, see benchmarks/orchestration.py). Against a
    real server (PREFECT_API_URL set, e.g. a worker running a deployment) they stay on.
    """
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield
