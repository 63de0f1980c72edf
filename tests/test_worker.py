"""A worker's settings, the data pull of a deployment's flow run, prefect.yaml against the registry,
the stack's credentials, and MLflow settings that must hold against a tracking server."""
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from flows import deploy, worker
from tasks.methods import list_methods
from tasks.platform import dvc_remote, services
from tasks.platform.common import StageError
from tasks.platform.tracking import artifact_location, redact

GOOD = {"DISTILLERY_REPO_URL": "file:///srv/distillery", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}


def test_preflight_accepts_a_complete_worker_environment():
    assert worker.preflight_problems(GOOD) == []
    assert worker.preflight_problems(dict(GOOD, DISTILLERY_DEVICE="cpu")) == []


@pytest.mark.parametrize("env,expected", [
    ({"MLFLOW_TRACKING_URI": "http://mlflow:5000"}, "DISTILLERY_REPO_URL is not set"),
    ({"DISTILLERY_REPO_URL": "file:///srv/d"}, "MLFLOW_TRACKING_URI is not set"),
    (dict(GOOD, MLFLOW_TRACKING_URI="sqlite:///mlflow.db"), "MLFLOW_TRACKING_URI must name a tracking server"),
    (dict(GOOD, MLFLOW_TRACKING_URI="postgresql://u@db/mlflow"), "temporary clone"),
    (dict(GOOD, DISTILLERY_DEVICE="gpu0"), "DISTILLERY_DEVICE='gpu0' is not one of"),
    (dict(GOOD, DISTILLERY_DEVICE="cuda:7"), "sees 0 CUDA device"),
])
def test_preflight_names_each_missing_or_wrong_setting(env, expected):
    if "cuda" in env.get("DISTILLERY_DEVICE", "") and __import__("torch").cuda.device_count() > 7:
        pytest.skip("this machine has 8 CUDA devices")
    problems = worker.preflight_problems(env)
    assert len(problems) == 1 and expected in problems[0]


def test_preflight_cli_exits_1_with_one_line_naming_the_setting():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DISTILLERY_", "MLFLOW_"))}
    proc = subprocess.run([sys.executable, "-m", "flows.worker", "preflight"], cwd=REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: worker environment: DISTILLERY_REPO_URL is not set")


# ---------------------------------------------------------------------------------------------------
# dvc pull on a worker

def git_dvc_repo(root: Path) -> Path:
    """A git + DVC repository whose stage `make` writes data/out/x.txt."""
    root.mkdir(parents=True)
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@l", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@l")
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    (root / "dvc.yaml").write_text("stages:\n  make:\n    cmd: mkdir -p data/out && echo hello > data/out/x.txt\n"
                                   "    outs: [data/out]\n")
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=root, env=env, check=True, capture_output=True)
    return root


def clone_without_data(src: Path, dst: Path) -> Path:
    """What a worker has before the pull: a git clone (dvc.lock, no data)."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@l"]
    subprocess.run([*git, "add", "-A"], cwd=src, check=True)
    subprocess.run([*git, "commit", "-qm", "data"], cwd=src, check=True)
    subprocess.run(["git", "clone", "-q", str(src), str(dst)], check=True)
    return dst


def test_pull_without_any_remote_fails_naming_the_setting(tmp_path):
    clone = clone_without_data(git_dvc_repo(tmp_path / "src"), tmp_path / "clone")
    with pytest.raises(StageError) as e:
        dvc_remote.pull("data/out", env={}, cwd=clone)
    assert e.value.path == "DISTILLERY_DVC_REMOTE" and "no default DVC remote" in e.value.problem


def test_pull_from_a_remote_without_the_data_fails_naming_the_data(tmp_path):
    clone = clone_without_data(git_dvc_repo(tmp_path / "src"), tmp_path / "clone")
    (tmp_path / "empty-remote").mkdir()
    with pytest.raises(StageError) as e:
        dvc_remote.pull("data/out", env={"DISTILLERY_DVC_REMOTE": str(tmp_path / "empty-remote")}, cwd=clone)
    assert e.value.path == "data/out" and "dvc pull failed" in e.value.problem
    assert not (clone / "data" / "out").exists()


def test_pull_fetches_the_data_from_the_workers_remote(tmp_path):
    src = git_dvc_repo(tmp_path / "src")
    remote = tmp_path / "remote"
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "--local", "r", str(remote)], cwd=src, check=True)
    assert subprocess.run([sys.executable, "-m", "dvc", "push", "-q", "-r", "r"], cwd=src).returncode == 0
    clone = clone_without_data(src, tmp_path / "clone")
    assert dvc_remote.pull("data/out", env={"DISTILLERY_DVC_REMOTE": str(remote)}, cwd=clone) == "data/out"
    assert (clone / "data" / "out" / "x.txt").read_text() == "hello\n"


# ---------------------------------------------------------------------------------------------------
# prefect.yaml

def test_prefect_yaml_is_generated_from_the_registry():
    assert (REPO / "prefect.yaml").read_text() == deploy.render(), "run `python -m flows.deploy`"


def test_every_method_has_one_valid_deployment_with_the_worker_pull_steps():
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.deployments.steps.core import run_steps  # noqa: F401  (the step runner exists)
    cfg = yaml.safe_load((REPO / "prefect.yaml").read_text())
    steps = [next(iter(s)) for s in cfg["pull"]]
    assert steps == ["prefect.deployments.steps.run_shell_script", "prefect.deployments.steps.git_clone",
                     "prefect.deployments.steps.set_working_directory"]
    assert cfg["pull"][0]["prefect.deployments.steps.run_shell_script"]["script"] == "python -m flows.worker preflight"
    assert cfg["pull"][1]["prefect.deployments.steps.git_clone"]["repository"] == "{{ $DISTILLERY_REPO_URL }}"
    crons = set()
    for d in cfg["deployments"]:
        module, fn = d["entrypoint"].split(":")
        flow = getattr(importlib.import_module(module), fn)
        assert set(d["parameters"]) <= set(flow.parameters.properties) and "method" in d["parameters"]
        for s in d["schedules"]:
            CronSchedule(cron=s["cron"], timezone=s["timezone"])
            crons.add(s["cron"])
        assert d["work_pool"]["name"] == "gpu" and d["concurrency_limit"] == 1
    assert sorted(d["parameters"]["method"] for d in cfg["deployments"]) == list_methods()
    assert len(crons) == len(cfg["deployments"])  # staggered: no two methods start together


# ---------------------------------------------------------------------------------------------------
# credentials and tracking-server settings

def test_credentials_come_from_the_environment_or_a_private_generated_file(tmp_path):
    path = tmp_path / "credentials.env"
    first = services.Credentials.load(path, env={})
    assert path.stat().st_mode & 0o777 == 0o600
    assert services.Credentials.load(path, env={}) == first  # kept across restarts
    override = services.Credentials.load(path, env={"MLFLOW_TRACKING_PASSWORD": "from-env"})
    assert override.MLFLOW_TRACKING_PASSWORD == "from-env" and override.DISTILLERY_PG_PASSWORD == first.DISTILLERY_PG_PASSWORD
    assert first.PREFECT_API_AUTH_STRING.startswith("admin:") and len(set(first.secrets())) == 4


def test_a_tracking_server_keeps_artifacts_itself_and_reports_redact_passwords(tmp_path):
    assert artifact_location("http://mlflow:5000", "mlartifacts", "m") is None
    assert artifact_location("sqlite:////x/mlflow.db", str(tmp_path / "art"), "m") == (tmp_path / "art" / "m").as_uri()
    assert artifact_location("sqlite:////x/mlflow.db", "s3://bucket/a", "m") == "s3://bucket/a/m"
    assert redact("http://alice:s3cret@mlflow:5000") == "http://alice:***@mlflow:5000"
    assert redact("http://mlflow:5000") == "http://mlflow:5000"


def test_a_flow_run_that_outlives_its_grace_is_killed_and_its_records_are_ended(tmp_path):
    """stop_children SIGKILLs a flow-run process still running after the grace and hands its flow-run
    id (read from its environment before the kill) to end_killed_flow_runs. In a process of its own:
    stop_children stops every child of the process it runs in."""
    script = tmp_path / "worker_stop.py"
    script.write_text(textwrap.dedent("""
        import os, subprocess, sys
        import flows.worker as w
        ended = []
        w.end_killed_flow_runs = lambda ids, grace: ended.extend(ids)
        ignores = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print(1, flush=True); time.sleep(60)"
        obeys = "import time; print(1, flush=True); time.sleep(60)"
        stubborn = subprocess.Popen([sys.executable, "-c", ignores], stdout=subprocess.PIPE,
                                    env={**os.environ, "PREFECT__FLOW_RUN_ID": "0b6a4b3e-7c1d-4a55-9d0e-2f6c1a9b8e01"})
        polite = subprocess.Popen([sys.executable, "-c", obeys], stdout=subprocess.PIPE,
                                  env={**os.environ, "PREFECT__FLOW_RUN_ID": "5d1f0c2a-0000-4000-8000-000000000002"})
        stubborn.stdout.readline(), polite.stdout.readline()  # both run, SIGTERM handling in place
        n = w.stop_children(grace=1.0)
        import psutil
        print(n, ended, [psutil.pid_exists(p.pid) for p in (stubborn, polite)])
    """))
    out = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    # both stopped; only the one that ignored SIGTERM was left to kill, and has its records ended
    assert out.stdout.splitlines()[-1] == "2 ['0b6a4b3e-7c1d-4a55-9d0e-2f6c1a9b8e01'] [False, False]"
