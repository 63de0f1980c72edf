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

One pipeline at a time per checkout: a second `make run` stops at once, before starting its server,
and so does one started while a plain `dvc repro` runs here; a plain `dvc repro` started during a
`make run` meets DVC's own locks (`checkout_lock`, `dvc_lock`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from tasks.platform import services as sv
from tasks.platform.common import REPO_ROOT, StageError, cli_main

LOCAL_SERVER_ENV = "DISTILLERY_LOCAL_PREFECT"  # flows.runtime: heartbeats stay off on this server


def repro(args: list[str]) -> int:
    dvc = sv.bin_path("dvc")
    with checkout_lock(REPO_ROOT):
        env, server = None, None
        with dvc_lock(REPO_ROOT):  # no `dvc repro` runs here, and one started meanwhile fails at once
            if not os.environ.get("PREFECT_API_URL"):
                state = REPO_ROOT / ".prefect"
                state.mkdir(exist_ok=True)
                server = sv.start_prefect(state, sv.free_port(), None, services=False, home=state,
                                          timeout=300)
                env = dict(os.environ, PREFECT_API_URL=server.url, **{LOCAL_SERVER_ENV: "1"})
        try:
            return subprocess.run([dvc, "repro", *args], cwd=REPO_ROOT, env=env).returncode
        finally:
            if server is not None:
                server.stop()


def _busy(root: Path, who: str) -> StageError:
    return StageError(root, f"another `dvc repro` is running in this checkout ({who}); "
                            "wait for it or stop it")


def _try_flock(f) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def checkout_lock(root: Path) -> Iterator[None]:
    """Holds the checkout for one `make run`, or raises a StageError naming the run that holds it.

    An flock on .dvc/tmp/repro.lock: the kernel releases it when this process exits, however it
    exits (a crashed or killed run never blocks the next), and it is not inherited by the dvc or
    server processes this one starts (Python opens files close-on-exec)."""
    tmp = root / ".dvc" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    with open(tmp / "repro.lock", "a+") as f:
        if not _try_flock(f):
            f.seek(0)
            raise _busy(root, f"pid {f.read().strip() or '?'}: python -m flows.repro")
        f.truncate(0)
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield


@contextlib.contextmanager
def dvc_lock(root: Path) -> Iterator[None]:
    """Holds DVC's own repository lock, or raises a StageError naming the `dvc repro` that runs here.

    DVC holds .dvc/tmp/lock (an flock) while it plans and records stages, but lets go of it while a
    stage's command runs (so that `dvc repro`s of unrelated stages may run side by side); then it
    lists itself in .dvc/tmp/rwlock against the stage's dependencies and outputs (edited only by a
    holder of that lock, so it reads consistently here)."""
    import psutil
    tmp = root / ".dvc" / "tmp"
    with open(tmp / "lock", "a+") as f:  # never written: DVC writes its pid there when it holds it
        if not _try_flock(f):
            f.seek(0)
            raise _busy(root, f"pid {f.read().strip() or '?'}: dvc")
        try:
            rwlock = json.loads((tmp / "rwlock").read_text())
        except (FileNotFoundError, ValueError):
            rwlock = {}
        readers = [h for hs in rwlock.get("read", {}).values() for h in hs]
        for h in [*rwlock.get("write", {}).values(), *readers]:
            if psutil.pid_exists(h["pid"]):
                raise _busy(root, f"pid {h['pid']}: {h['cmd']}")
        yield


def main(argv: list[str]) -> None:
    # SIGTERM (a stopped job, a test's clean-up) unwinds like Ctrl-C, so the server stops with us
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    sys.exit(repro(argv))


if __name__ == "__main__":
    cli_main(main)
