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
flow runs SIGTERM and `--grace` seconds to end (their MLflow runs close as KILLED), SIGKILLs a
flow run still running then and ends its records for it (Prefect: Crashed, MLflow: KILLED), and exits.
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
    """SIGTERM to this process's children (the flow runs), SIGKILL to whatever is left after `grace`;
    then the records of the flow runs killed so are ended for them (`end_killed_flow_runs`)."""
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
    killed_flow_runs = set()
    for child in left:
        try:
            killed_flow_runs.add(child.environ().get("PREFECT__FLOW_RUN_ID"))  # unreadable once it is gone
            child.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(left, timeout=5)
    killed_flow_runs.discard(None)
    if killed_flow_runs:
        end_killed_flow_runs(sorted(killed_flow_runs), grace)
    return len(children)


def end_killed_flow_runs(flow_run_ids: list[str], grace: float) -> None:
    """What a flow run SIGKILLed after its grace could not close itself: its Prefect flow run becomes
    Crashed, and its MLflow runs, whose owner process is gone, KILLED (as the next flow on this host
    would mark them, `tracking.end_orphaned_runs`). Best effort: the servers may be going too."""
    from uuid import UUID

    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    from tasks.platform.tracking import end_orphaned_runs
    message = f"killed by the worker: still running {grace:.0f} s after SIGTERM"
    runs = ", ".join(flow_run_ids)
    try:
        with get_client(sync_client=True) as client:
            for flow_run_id in flow_run_ids:
                client.set_flow_run_state(UUID(flow_run_id), Crashed(message=message), force=True)
        mlflow = MlflowClient()  # MLFLOW_TRACKING_URI: a worker's preflight requires it
        for experiment in mlflow.search_experiments():
            end_orphaned_runs(mlflow, experiment.experiment_id)
    except Exception as e:  # noqa: BLE001  (the worker is stopping; say so and go on)
        print(f"worker: could not end the records of killed flow run(s) {runs}: {e}", flush=True)
    else:
        print(f"worker: flow run(s) {runs} {message}; marked Crashed (Prefect) and their runs KILLED (MLflow)",
              flush=True)


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
