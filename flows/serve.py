"""The shared setup on one machine: PostgreSQL, an MLflow server and a Prefect server on it, a worker.

    make serve          # python -m flows.serve: in the foreground; Ctrl-C or SIGTERM stops everything
    make serve-stop     # python -m flows.serve stop: SIGTERM to a running `make serve`
    eval "$(python -m flows.serve env)"   # point this shell's clients (dvc repro, mlflow, prefect) at it

Everything binds 127.0.0.1 unless `--host` says otherwise, with access control on (SCRAM passwords in
PostgreSQL, MLflow's basic-auth app, Prefect's API auth string). Credentials come from the environment
or `<state>/credentials.env`, generated on first start (mode 0600, git-ignored); they are passed to
the servers through their environment and printed by nothing but `env`. State (databases, artifacts,
logs) lives in `--state-dir`, default `.serve/`, so a restart keeps runs, models and deployments.

The worker clones DISTILLERY_REPO_URL (default: this checkout) and pulls data from
DISTILLERY_DVC_REMOTE (default: `<state>/dvc-remote`, registered in this checkout as the DVC remote
`serve`; `make serve` pushes what the local DVC cache holds to it).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

from tasks.platform.common import REPO_ROOT, StageError, cli_main, write_json
from tasks.platform import services as sv

POOL = "gpu"
STATE_DIR = REPO_ROOT / ".serve"


def start_stack(state: Path, host: str, pg_port: int, mlflow_port: int, prefect_port: int,
                deploy: bool, push_data: bool) -> list[sv.Service]:
    """Starts the servers in dependency order; stops the ones already started if a later one fails."""
    state.mkdir(parents=True, exist_ok=True)
    creds = sv.Credentials.load(state / "credentials.env")
    pw = creds.DISTILLERY_PG_PASSWORD
    started: list[sv.Service] = []
    try:
        t0 = time.monotonic()
        pg = sv.start_postgres(state / "postgres", pg_port, pw, host=host,
                               databases={"mlflow": "mlflow", "mlflow_auth": "mlflow", "prefect": "prefect"})
        started.append(pg)
        print(f"postgres  {pg.url}  ({time.monotonic() - t0:.1f} s)", flush=True)

        t0 = time.monotonic()
        db = f"{host}:{pg_port}"
        mlflow = sv.start_mlflow(state, mlflow_port, f"postgresql+psycopg2://mlflow@{db}/mlflow", creds, host=host,
                                 pg_password=pw, auth_uri=f"postgresql+psycopg2://mlflow@{db}/mlflow_auth")
        started.append(mlflow)
        print(f"mlflow    {mlflow.url}  ({time.monotonic() - t0:.1f} s)", flush=True)

        t0 = time.monotonic()
        prefect = sv.start_prefect(state, prefect_port, creds, host=host,
                                   database_url=f"postgresql+asyncpg://prefect:{quote(pw, safe='')}@{db}/prefect")
        started.append(prefect)
        print(f"prefect   {prefect.url}  ({time.monotonic() - t0:.1f} s)", flush=True)

        client = sv.client_env(prefect, mlflow, creds, PREFECT_HOME=str(state / "prefect-client"))
        ensure_work_pool(POOL, client)
        if deploy:
            run_checked([sv.bin_path("prefect"), "--no-prompt", "deploy", "--all"], client, "prefect deploy")
        worker_env = dict(client, **worker_settings(state, push_data))
        worker = sv.start_worker(POOL, worker_env, state / "worker.log", cwd=state)
        started.append(worker)
        print(f"worker    pool {POOL!r}, pid {worker.pid}", flush=True)
    except BaseException:
        for svc in reversed(started):
            svc.stop()
        raise
    return started


def worker_settings(state: Path, push_data: bool) -> dict[str, str]:
    """The worker's repository and DVC remote: the user's, or this checkout and a local remote."""
    env = {k: os.environ[k] for k in ("DISTILLERY_DEVICE",) if os.environ.get(k)}
    env["DISTILLERY_REPO_URL"] = os.environ.get("DISTILLERY_REPO_URL") or REPO_ROOT.as_uri()
    remote = os.environ.get("DISTILLERY_DVC_REMOTE")
    if not remote:
        remote = str(state / "dvc-remote")
        run_checked([sv.bin_path("dvc"), "remote", "add", "--local", "--force", "serve", remote], None, "dvc remote add")
        if push_data:
            # best effort: a fresh clone has nothing to push yet (then run `dvc repro` and push)
            pushed = subprocess.run([sv.bin_path("dvc"), "push", "--remote", "serve"], cwd=REPO_ROOT, capture_output=True, text=True)
            print(f"dvc push --remote serve: {'ok' if pushed.returncode == 0 else 'incomplete (run dvc repro first)'}")
    env["DISTILLERY_DVC_REMOTE"] = remote
    return env


def run_checked(cmd: list[str], env: dict[str, str] | None, what: str) -> None:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise StageError(what, f"exited {proc.returncode}: {' | '.join(tail)}")


def ensure_work_pool(name: str, env: dict[str, str]) -> None:
    prefect = sv.bin_path("prefect")
    if subprocess.run([prefect, "work-pool", "inspect", name], env=env, capture_output=True).returncode:
        run_checked([prefect, "work-pool", "create", name, "--type", "process"], env, f"work pool {name}")


def serve(args: argparse.Namespace) -> None:
    state = Path(args.state_dir).resolve()
    pid_file = state / "serve.pid"
    if pid_file.exists() and _running(int(pid_file.read_text())):
        raise StageError(pid_file, f"a stack is already running (pid {pid_file.read_text().strip()})")
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    services = start_stack(state, args.host, args.pg_port, args.mlflow_port, args.prefect_port,
                           deploy=args.deploy, push_data=not args.no_push)
    pid_file.write_text(str(os.getpid()))
    write_json(state / "serve.json", {
        "pid": os.getpid(), "host": args.host,
        "services": {s.name: {"url": s.url, "pid": s.pid, "pids": s.pids or [s.pid], "log": str(s.log)}
                     for s in services}})
    print(f"ready; credentials in {state / 'credentials.env'}; clients: eval \"$(python -m flows.serve env)\"; "
          f"stop with Ctrl-C or `make serve-stop`", flush=True)
    status = 0
    try:
        while stop["signal"] is None:
            dead = [s for s in services if s.name != "postgres" and s.proc.poll() is not None]
            if dead:
                print(f"error: {dead[0].name} exited ({dead[0].proc.returncode}); see {dead[0].log}", file=sys.stderr)
                status = 1
                break
            time.sleep(0.5)
    finally:
        for svc in reversed(services):
            print(f"stopping {svc.name}: {svc.stop():.1f} s", flush=True)
        pid_file.unlink(missing_ok=True)
    sys.exit(status)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_running(state_dir: str, timeout: float = 120.0) -> None:
    pid_file = Path(state_dir) / "serve.pid"
    if not pid_file.exists():
        print("no stack running")
        return
    pid = int(pid_file.read_text())
    if _running(pid):
        os.kill(pid, signal.SIGTERM)
        t0 = time.monotonic()
        while _running(pid) and time.monotonic() - t0 < timeout:
            time.sleep(0.2)
    print(f"stopped (pid {pid})")


def print_env(state_dir: str) -> None:
    """`export` lines for a shell that should use the running stack (prints its credentials)."""
    state = Path(state_dir)
    info = json.loads((state / "serve.json").read_text())
    creds = sv.Credentials.load(state / "credentials.env", env={})
    env = {"MLFLOW_TRACKING_URI": info["services"]["mlflow"]["url"],
           "MLFLOW_TRACKING_USERNAME": creds.MLFLOW_TRACKING_USERNAME,
           "MLFLOW_TRACKING_PASSWORD": creds.MLFLOW_TRACKING_PASSWORD,
           "PREFECT_API_URL": info["services"]["prefect"]["url"],
           "PREFECT_API_AUTH_STRING": creds.PREFECT_API_AUTH_STRING}
    print("\n".join(f"export {k}='{v}'" for k, v in env.items()))


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__.splitlines()[0])
    ap.add_argument("command", nargs="?", default="up", choices=["up", "stop", "env"])
    ap.add_argument("--state-dir", default=str(STATE_DIR))
    ap.add_argument("--host", default=os.environ.get("DISTILLERY_SERVE_HOST", sv.LOOPBACK),
                    help="address the servers bind (default 127.0.0.1)")
    ap.add_argument("--pg-port", type=int, default=5433)
    ap.add_argument("--mlflow-port", type=int, default=5000)
    ap.add_argument("--prefect-port", type=int, default=4200)
    ap.add_argument("--deploy", action="store_true", help="also `prefect deploy --all` from prefect.yaml")
    ap.add_argument("--no-push", action="store_true", help="do not push the DVC cache to the local remote")
    args = ap.parse_args(argv)
    if args.command == "stop":
        stop_running(args.state_dir)
    elif args.command == "env":
        print_env(args.state_dir)
    else:
        serve(args)


if __name__ == "__main__":
    cli_main(main)
