"""`dvc repro` with one Prefect server for the whole pipeline: what `make run` runs.

    python -m flows.repro [DVC REPRO ARGS...]      # e.g. python -m flows.repro train@pangu

Each training stage is a process of its own. On Prefect's ephemeral API every one of them starts its
own server, ~7 s a stage here (12 s on a new database), and on a loaded 2-core machine that start
timed out after Prefect's 20 s, failing the stage. Here one server (SQLite in the project's
`.prefect/`, no scheduler or other services, loopback, a free port) starts once (~5 s), every stage
connects to it (~0.3 s), and it stops when `dvc repro` ends, whatever way it ends. With
PREFECT_API_URL already set, `dvc repro` runs against that server instead. Plain `dvc repro` still
works: prefect.toml gives the ephemeral server 120 s to start (benchmarks/orchestration.py measures
the three ways).
"""
from __future__ import annotations

import os
import subprocess
import sys

from tasks.platform import services as sv
from tasks.platform.common import REPO_ROOT

LOCAL_SERVER_ENV = "DISTILLERY_LOCAL_PREFECT"  # flows.runtime: heartbeats stay off on this server


def repro(args: list[str]) -> int:
    dvc = sv.bin_path("dvc")
    if os.environ.get("PREFECT_API_URL"):
        return subprocess.run([dvc, "repro", *args], cwd=REPO_ROOT).returncode
    state = REPO_ROOT / ".prefect"
    state.mkdir(exist_ok=True)
    server = sv.start_prefect(state, sv.free_port(), None, services=False, home=state, timeout=300)
    env = dict(os.environ, PREFECT_API_URL=server.url, **{LOCAL_SERVER_ENV: "1"})
    try:
        return subprocess.run([dvc, "repro", *args], cwd=REPO_ROOT, env=env).returncode
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(repro(sys.argv[1:]))
