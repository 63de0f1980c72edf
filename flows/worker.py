"""A Prefect worker for Distillery's deployments, and the checks their pull steps run on it.

    python -m flows.worker start --pool gpu [--name NAME] [--limit N] [--grace 30]
    python -m flows.worker preflight          # the first pull step of every deployment (prefect.yaml)

A worker host needs (README, "Running on GPU workers"):

    DISTILLERY_REPO_URL     the git repository cloned for every flow run
    DISTILLERY_DVC_REMOTE   the DVC remote with the prepared data (unless the repo commits a default one)
    MLFLOW_TRACKING_URI     the shared tracking server: a flow run's clone is deleted after the run
    DISTILLERY_DEVICE       optional: cpu, cuda or cuda:N (default: the method's params, `auto`)
    PREFECT_API_URL         (+ PREFECT_API_AUTH_STRING, MLFLOW_TRACKING_USERNAME/PASSWORD with auth on)

`start` runs Prefect's process worker under our own signal handling: `prefect worker start` in
Prefect 3.8 ignores SIGTERM and SIGINT (the CLI turns them into a cancellation that anyio's task
group swallows) and has to be SIGKILLed. Here the first SIGTERM/SIGINT stops polling, gives running
flow runs SIGTERM and `--grace` seconds to end (their MLflow runs close as KILLED), then exits.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from pathlib import Path

from tasks.platform.common import StageError, cli_main

from .runtime import tracking_problems

DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def preflight_problems(env: dict[str, str]) -> list[str]:
    """What is missing or wrong in a worker's settings, one sentence each (empty: ready)."""
    problems = []
    if not env.get("DISTILLERY_REPO_URL"):
        problems.append("DISTILLERY_REPO_URL is not set: the git repository the worker clones for every flow run "
                        "(e.g. https://git.example.org/distillery.git or file:///srv/distillery)")
    problems += tracking_problems(env)
    device = env.get("DISTILLERY_DEVICE")
    if device:
        if not DEVICE_RE.match(device):
            problems.append(f"DISTILLERY_DEVICE={device!r} is not one of auto, cpu, cuda, cuda:N")
        elif device.startswith("cuda"):
            import torch
            index = int(device.partition(":")[2] or 0)
            if not torch.cuda.is_available() or index >= torch.cuda.device_count():
                problems.append(f"DISTILLERY_DEVICE={device} but torch {torch.__version__} sees "
                                f"{torch.cuda.device_count()} CUDA device(s)")
    return problems


def preflight(env: dict[str, str] | None = None) -> None:
    problems = preflight_problems(dict(os.environ if env is None else env))
    if problems:
        raise StageError("worker environment", "; ".join(problems))
    print("worker settings: ok")


# ---------------------------------------------------------------------------------------------------
# the worker

def stop_children(grace: float) -> int:
    """SIGTERM to this process's children (the flow runs), SIGKILL to whatever is left after `grace`."""
    import psutil
    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, left = psutil.wait_procs(children, timeout=grace)
    # and whatever a flow run started while it was ending
    left += [c for c in psutil.Process().children(recursive=True) if c not in left]
    for child in left:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    return len(children)


async def run_worker(pool: str, name: str | None = None, limit: int | None = None, grace: float = 30.0) -> None:
    import anyio
    from prefect.workers.process import ProcessWorker

    async with anyio.create_task_group() as tg:
        async def stop_on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for sig in signals:
                    print(f"worker: {signal.Signals(sig).name}, stopping (flow runs get SIGTERM and "
                          f"{grace:.0f} s)", flush=True)
                    n = await anyio.to_thread.run_sync(stop_children, grace)
                    print(f"worker: stopped {n} flow-run process(es)", flush=True)
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(stop_on_signal)
        await ProcessWorker(work_pool_name=pool, name=name, limit=limit).start()
        tg.cancel_scope.cancel()


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.worker", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="run a process worker on a pool")
    start.add_argument("--pool", required=True)
    start.add_argument("--name", default=None)
    start.add_argument("--limit", type=int, default=None, help="flow runs at once (default: no limit)")
    start.add_argument("--grace", type=float, default=30.0, help="seconds a flow run gets to end on stop")
    sub.add_parser("preflight", help="check this worker's settings")
    args = ap.parse_args(argv)

    if args.command == "preflight":
        preflight()
    else:
        import anyio
        # flow runs and their pull steps (`python -m flows.worker ...`, `dvc`) must find this
        # environment's programs even when the worker was started without activating it
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        anyio.run(run_worker, args.pool, args.name, args.limit, args.grace)
        print("worker: stopped", flush=True)


if __name__ == "__main__":
    cli_main(main)
