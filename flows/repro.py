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
import time
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
                stop_orphaned_server(state)
                server = sv.start_prefect(state, sv.free_port(), None, services=False, home=state,
                                          timeout=300)
                record_server(state, server.pid)
                env = dict(os.environ, PREFECT_API_URL=server.url, **{LOCAL_SERVER_ENV: "1"})
        try:
            return subprocess.run([dvc, "repro", *args], cwd=REPO_ROOT, env=env).returncode
        finally:
            if server is not None:
                server.stop()
                (state / SERVER_PID).unlink(missing_ok=True)


# A run killed with SIGKILL (or by the OOM killer) cannot stop its server, a session leader of its
# own that the kill did not reach. The server's pid and start time are kept here, and the next run,
# which holds the checkout lock and so knows no live run owns that server, stops it.
SERVER_PID = "server.pid"


def record_server(state: Path, pid: int) -> None:
    import psutil
    try:
        started = psutil.Process(pid).create_time()
    except (psutil.Error, ValueError):  # gone already: nothing a later run could stop
        return
    (state / SERVER_PID).write_text(f"{pid} {started:.3f}\n")


def stop_orphaned_server(state: Path) -> int | None:
    """Kills the process group of a server a killed run left; returns its pid, or None."""
    import psutil
    try:
        pid, started = (state / SERVER_PID).read_text().split()
        alive = f"{psutil.Process(int(pid)).create_time():.3f}" == started  # not a reused pid
    except (FileNotFoundError, ValueError, psutil.NoSuchProcess):
        alive = False
    (state / SERVER_PID).unlink(missing_ok=True)
    if not alive:
        return None
    with contextlib.suppress(ProcessLookupError):
        os.killpg(int(pid), signal.SIGKILL)
    print(f"flows.repro: stopped the Prefect server (pid {pid}) a killed run had left", file=sys.stderr)
    return int(pid)


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
        holders = [*rwlock.get("write", {}).values(), *readers]
        for h in holders:
            if _running(h["pid"]):
                raise _busy(root, f"pid {h['pid']}: {h['cmd']}")
        if holders:
            # left by a `dvc repro` that was killed: DVC would refuse every stage it had locked ("is
            # busy, it is being blocked by…") until someone removed the file by hand, as its message
            # advises; holding DVC's lock with every holder dead, this run does it
            (tmp / "rwlock").unlink()
            pids = ", ".join(str(h["pid"]) for h in holders)
            print(f"flows.repro: removed DVC's stale stage locks of dead process(es) {pids}", file=sys.stderr)
        yield


def _running(pid: int) -> bool:
    """Alive and not a zombie: a killed `dvc` whose parent died too stays a zombie until init reaps it,
    and holds no lock."""
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def main(argv: list[str]) -> None:
    # SIGTERM (a stopped job, a test's clean-up) unwinds like Ctrl-C, so the server stops with us
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    t0 = time.monotonic()
    code = repro(argv)
    minutes, seconds = divmod(round(time.monotonic() - t0), 60)
    print(f"pipeline: {'done' if code == 0 else f'failed (dvc exited {code})'} in {minutes} min {seconds} s")
    sys.exit(code)


if __name__ == "__main__":
    cli_main(main)
