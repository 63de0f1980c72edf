"""The shared setup against real servers, on loopback only: `python -m flows.serve` (what `make serve`
runs) starts PostgreSQL, an MLflow server and a Prefect server on it, and a worker; every process is
started here and stopped by its PID.

- access control: each server refuses an unauthenticated request and accepts an authenticated one;
- the method flow against the MLflow server by setting only its address (and credentials): the same
  registry, alias and lineage checks as the SQLite e2e test;
- `prefect deploy` from prefect.yaml; a scheduled run that fires on its own and a manual
  `prefect deployment run`, both Completed by the worker, their results in the server's store;
- stopping the stack with a flow run in flight: everything exits within seconds and no MLflow run
  or Prefect flow run is left RUNNING.
"""
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
import yaml

from checks import check_classification_method_recorded, runs_by_role
from conftest import REPO, copy_checkout
from tasks.platform import services as sv

pytestmark = pytest.mark.servers
METHOD_CLI, METHOD_DEPLOYED = "fitnet_hint", "hinton_kd"


def describe(pids):
    import psutil
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            p = psutil.Process(pid)
            out.append(f"{pid} {p.status()} {' '.join(p.cmdline())[:200]}")
    return out


def sh(cmd, cwd, env, check=True, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def workdir():
    # not pytest's tmp_path: /tmp/pytest-of-root is 0700 and PostgreSQL runs as `postgres`
    import tempfile
    d = Path(tempfile.mkdtemp(prefix="distillery-servers-"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def repo(workdir):
    """A git repository (branch main) of this checkout with small CI budgets in params.yaml and one
    scheduled deployment, its digits data produced by DVC and pushed to a local DVC remote."""
    root = workdir / "repo"
    copy_checkout(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for m in (METHOD_CLI, METHOD_DEPLOYED):
        params["methods"][m].update(seeds=[0, 1])
        params["methods"][m]["teacher"]["epochs"] = 3
        params["methods"][m]["student"]["epochs"] = 3
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # a slow variant, for stopping the stack with a run in flight
    params["methods"][METHOD_DEPLOYED]["teacher"]["epochs"] = 400
    (root / "params_slow.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@localhost")
    env = {k: v for k, v in env.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    sh(["git", "init", "-q", "-b", "main"], root, env)
    sh(["dvc", "repro", "digits"], root, env)
    remote = workdir / "dvc-remote"
    sh(["dvc", "remote", "add", "--local", "ci", str(remote)], root, env)
    sh(["dvc", "push", "--remote", "ci", "digits"], root, env)
    sh(["git", "add", "-A"], root, env)
    sh(["git", "commit", "-qm", "servers test"], root, env)
    return root, remote


@pytest.fixture(scope="module")
def stack(workdir, repo):
    """`python -m flows.serve` on free ports, with a fast scheduler and worker poll; stopped by PID."""
    root, remote = repo
    state = workdir / "state"
    ports = {k: sv.free_port() for k in ("pg", "mlflow", "prefect")}
    env = dict(os.environ, DISTILLERY_REPO_URL=root.as_uri(), DISTILLERY_DVC_REMOTE=str(remote),
               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5", PREFECT_WORKER_QUERY_SECONDS="2",
               PREFECT_WORKER_PREFETCH_SECONDS="5")
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "flows.serve", "--state-dir", str(state),
                             "--pg-port", str(ports["pg"]), "--mlflow-port", str(ports["mlflow"]),
                             "--prefect-port", str(ports["prefect"]), "--no-push"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("ready"):
            break
    else:
        pytest.fail("flows.serve exited before it was ready:\n" + "".join(lines))
    info = json.loads((state / "serve.json").read_text())
    creds = sv.Credentials.load(state / "credentials.env", env={})
    stack = {"proc": proc, "state": state, "info": info, "creds": creds, "started_s": time.monotonic() - t0,
             "startup": "".join(lines)}
    print(stack["startup"])
    yield stack
    if proc.poll() is None:  # a failed test left it running
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(120)


def client_env(stack, **extra):
    creds, services = stack["creds"], stack["info"]["services"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               MLFLOW_TRACKING_URI=services["mlflow"]["url"], MLFLOW_TRACKING_USERNAME=creds.MLFLOW_TRACKING_USERNAME,
               MLFLOW_TRACKING_PASSWORD=creds.MLFLOW_TRACKING_PASSWORD, PREFECT_API_URL=services["prefect"]["url"],
               PREFECT_API_AUTH_STRING=creds.PREFECT_API_AUTH_STRING, **extra)
    return env


def mlflow_client(stack, monkeypatch):
    from mlflow.tracking import MlflowClient
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", stack["creds"].MLFLOW_TRACKING_USERNAME)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack["creds"].MLFLOW_TRACKING_PASSWORD)
    return MlflowClient(stack["info"]["services"]["mlflow"]["url"])


def prefect_api(stack, path, body=None):
    user, _, pw = stack["creds"].PREFECT_API_AUTH_STRING.partition(":")
    url = stack["info"]["services"]["prefect"]["url"] + path
    r = httpx.post(url, json=body or {}, auth=(user, pw), timeout=30) if body is not None else \
        httpx.get(url, auth=(user, pw), timeout=30)
    r.raise_for_status()
    return r.json()


# ---------------------------------------------------------------------------------------------------

def test_each_server_refuses_anonymous_requests_and_accepts_its_credentials(stack):
    import psycopg2
    creds, services = stack["creds"], stack["info"]["services"]
    mlflow_api = services["mlflow"]["url"] + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert httpx.get(mlflow_api).status_code == 401
    assert httpx.get(mlflow_api, auth=(creds.MLFLOW_TRACKING_USERNAME, "wrong")).status_code == 401
    assert httpx.get(mlflow_api, auth=(creds.MLFLOW_TRACKING_USERNAME, creds.MLFLOW_TRACKING_PASSWORD)).status_code == 200

    pools = services["prefect"]["url"] + "/work_pools/filter"
    user, _, pw = creds.PREFECT_API_AUTH_STRING.partition(":")
    assert httpx.post(pools, json={}).status_code == 401
    assert httpx.post(pools, json={}, auth=(user, "wrong")).status_code == 401
    assert httpx.post(pools, json={}, auth=(user, pw)).status_code == 200

    port = int(services["postgres"]["url"].rsplit(":", 1)[1])
    for role, db in (("postgres", "postgres"), ("mlflow", "mlflow"), ("prefect", "prefect")):
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            psycopg2.connect(host=sv.LOOPBACK, port=port, user=role, password="wrong", dbname=db)
        psycopg2.connect(host=sv.LOOPBACK, port=port, user=role, password=creds.DISTILLERY_PG_PASSWORD,
                         dbname=db).close()
    # bound to loopback only
    for name in ("mlflow", "prefect"):
        assert "127.0.0.1" in services[name]["url"]
    # the generated credentials file is private
    assert (stack["state"] / "credentials.env").stat().st_mode & 0o077 == 0


def test_method_flow_records_into_the_mlflow_server_by_configuration_only(stack, repo, monkeypatch):
    from tasks.platform.common import hash_path
    from tasks.platform.lineage import dvc_lock_md5
    root, _ = repo
    env = client_env(stack)
    del env["PREFECT_API_URL"], env["PREFECT_API_AUTH_STRING"]  # the flow itself on Prefect's ephemeral API
    proc = sh([sys.executable, "-m", "flows.method", METHOD_CLI], root, env)
    assert "claim" in proc.stdout + proc.stderr
    lineage = {"git_commit": sh(["git", "rev-parse", "HEAD"], root, os.environ).stdout.strip(),
               "data_sha256": hash_path(root / "data" / "digits"),
               "dvc_lock_md5": dvc_lock_md5("data/digits", root / "dvc.lock")}
    client = mlflow_client(stack, monkeypatch)
    report = check_classification_method_recorded(client, root, METHOD_CLI, lineage)
    assert report == json.loads((root / "metrics" / f"{METHOD_CLI}.json").read_text())
    assert report["mlflow"]["tracking_uri"] == stack["info"]["services"]["mlflow"]["url"]
    # artifacts went to the server (proxied), not to a directory of the client
    exp = client.get_experiment_by_name(METHOD_CLI)
    assert exp.artifact_location.startswith("mlflow-artifacts:")
    assert not (root / "mlartifacts").exists() and not (root / "mlflow.db").exists()


def test_scheduled_and_manual_deployment_runs_complete_on_the_worker(stack, repo, monkeypatch):
    root, _ = repo
    env = client_env(stack)
    # deploy prefect.yaml as committed, but for one method that fires once, ~20 s from now (its
    # next run is an hour later)
    cfg = yaml.safe_load((root / "prefect.yaml").read_text())
    name = METHOD_DEPLOYED.replace("_", "-")
    cfg["deployments"] = [d for d in cfg["deployments"] if d["name"] == name]
    assert cfg["deployments"], f"prefect.yaml has no deployment {name}"
    anchor = datetime.now(timezone.utc) + timedelta(seconds=20)
    cfg["deployments"][0]["schedules"] = [{"interval": 3600, "anchor_date": anchor.isoformat(), "timezone": "UTC"}]
    (root / "prefect.test.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    sh(["prefect", "--no-prompt", "deploy", "--all", "--prefect-file", "prefect.test.yaml"], root, env)
    deployed_at = datetime.now(timezone.utc)
    sh(["prefect", "deployment", "run", f"method/{name}"], root, env)

    deadline = time.monotonic() + 300  # each run takes ~1 min here; the scheduled one waits for the manual
    while time.monotonic() < deadline:
        runs = prefect_api(stack, "/flow_runs/filter", {"sort": "EXPECTED_START_TIME_ASC"})
        states = [r["state_type"] for r in runs]
        if any(s in ("FAILED", "CRASHED") for s in states):
            break
        if states.count("COMPLETED") >= 2:
            break
        time.sleep(3)
    timeline = [(r["name"], r["auto_scheduled"], r["state_type"], r["expected_start_time"], r["start_time"],
                 r["end_time"]) for r in runs]
    print("deployed", deployed_at.isoformat(), "anchor", anchor.isoformat())
    print("\n".join(map(str, timeline)))
    scheduled = [r for r in runs if r["auto_scheduled"] and r["state_type"] != "SCHEDULED"]
    manual = [r for r in runs if not r["auto_scheduled"]]
    worker_log = Path(stack["info"]["services"]["worker"]["log"]).read_text()[-4000:]
    assert scheduled and scheduled[0]["state_type"] == "COMPLETED", worker_log
    assert manual and manual[0]["state_type"] == "COMPLETED", worker_log
    # the scheduled run started on its own, at its scheduled time (anchor), after the deploy
    start = datetime.fromisoformat(scheduled[0]["start_time"])
    assert start >= datetime.fromisoformat(scheduled[0]["expected_start_time"]) - timedelta(seconds=10)

    client = mlflow_client(stack, monkeypatch)
    by_role = runs_by_role(client, METHOD_DEPLOYED)
    parents = by_role["flow"]
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    commit = sh(["git", "rev-parse", "HEAD"], root, os.environ).stdout.strip()
    assert all(p.data.tags["distillery.git_commit"] == commit for p in parents)
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id)} >= {"report.json"}
    for name in (METHOD_DEPLOYED, f"{METHOD_DEPLOYED}_teacher"):
        assert client.search_model_versions(f"name='{name}'")
        assert client.get_model_version_by_alias(name, "champion")
    # nothing secret in what MLflow keeps
    secrets = stack["creds"].secrets()
    for runs in by_role.values():
        for r in runs:
            blob = json.dumps([r.data.params, r.data.tags])
            assert not any(s in blob for s in secrets)


def test_stopping_the_stack_with_a_run_in_flight_leaves_nothing_running(stack, repo, monkeypatch):
    import psycopg2
    root, _ = repo
    name = METHOD_DEPLOYED.replace("_", "-")
    sh(["prefect", "deployment", "run", f"method/{name}", "--param", "params_file=params_slow.yaml"],
       root, client_env(stack))
    client = mlflow_client(stack, monkeypatch)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:  # wait until the slow teacher is training
        running = [r for r in client.search_runs([client.get_experiment_by_name(METHOD_DEPLOYED).experiment_id])
                   if r.info.status == "RUNNING" and r.data.tags.get("distillery.role") == "teacher"]
        if running:
            break
        time.sleep(2)
    assert running, "the slow flow run never started its teacher"
    import psutil
    flow_run_pids = [p.pid for p in psutil.Process(stack["info"]["services"]["worker"]["pid"]).children(recursive=True)]
    assert flow_run_pids

    info, proc = stack["info"], stack["proc"]
    pids = [pid for s in info["services"].values() for pid in s["pids"]] + [proc.pid, *flow_run_pids]
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    stopped_s = time.monotonic() - t0
    print(out, f"stack stopped in {stopped_s:.1f} s")
    assert proc.returncode == 0 and stopped_s < 75  # the worker gives flow runs 30 s
    time.sleep(1)
    left = sv.alive(pids)
    assert left == [], (describe(left), Path(info["services"]["worker"]["log"]).read_text()[-4000:])

    # the record, read from PostgreSQL itself: no run left RUNNING in MLflow or in Prefect
    creds, state = stack["creds"], stack["state"]
    port = int(info["services"]["postgres"]["url"].rsplit(":", 1)[1])
    pg = sv.start_postgres(state / "postgres", port, creds.DISTILLERY_PG_PASSWORD)
    def counts(db, sql):
        with contextlib.closing(psycopg2.connect(host=sv.LOOPBACK, port=port, user=db, dbname=db,
                                                 password=creds.DISTILLERY_PG_PASSWORD)) as conn:
            cur = conn.cursor()
            cur.execute(sql)
            return dict(cur.fetchall())
    try:
        statuses = counts("mlflow", "SELECT status, count(*) FROM runs GROUP BY status")
        flow_states = counts("prefect", "SELECT state_type, count(*) FROM flow_run GROUP BY state_type")
    finally:
        pg.stop()
    print("mlflow runs", statuses, "prefect flow runs", flow_states)
    assert "RUNNING" not in statuses and statuses.get("KILLED", 0) >= 1
    assert "RUNNING" not in flow_states and "PENDING" not in flow_states

    # no secret in any log of the stack
    secrets = creds.secrets()
    for log in state.glob("*.log"):
        text = log.read_text(errors="replace")
        assert not any(s in text for s in secrets), log
