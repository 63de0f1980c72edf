"""Concurrency: four method flows at once on the default SQLite MLflow store record everything; two
pipelines at once in one checkout: the second stops at once, changing nothing.

Run as a script, this file is one flow process (the kind-seam test's tiny kind under another name):
    python tests/test_concurrency.py NAME PARAMS REPORT
"""
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import REPO

METHODS = [f"seam_{c}" for c in "abcd"]
SEEDS = [0, 1]
TRAIN = {"epochs": 20, "batch_size": 32, "lr": 0.03}


def flow_process(argv):
    """One method flow, `python -m flows.method NAME --params P --report R`, on the kind-seam kind
    declared under NAME (its models are family `test_kind_seam`, as in that test)."""
    import dataclasses

    import test_kind_seam  # noqa: F401  (registers the kind, its models and losses, and seam_sine)
    from flows.method import main
    from tasks.methods import get_method, register_method
    from tasks.platform.common import cli_main
    name, params, report = argv
    register_method(dataclasses.replace(get_method("seam_sine"), name=name))
    sys.argv = ["flows.method", name, "--params", params, "--report", report]
    cli_main(main)


def test_four_method_flows_at_once_record_everything(tmp_path):
    from mlflow.tracking import MlflowClient

    from test_kind_seam import write_points
    store = f"sqlite:///{tmp_path}/mlflow.db"
    methods = {}
    for i, name in enumerate(METHODS):  # data of its own: no method reuses another's cached training
        write_points(tmp_path / name, seed=i)
        methods[name] = {"kind": "seam_regression", "models": "test_kind_seam", "data": str(tmp_path / name),
                         "seeds": SEEDS, "teacher": TRAIN, "student": {**TRAIN, "cache_teacher": True}}
    params = tmp_path / "params.yaml"
    tracking = {"tracking_uri": store, "artifact_root": str(tmp_path / "art")}
    params.write_text(yaml.safe_dump({"tracking": tracking, "methods": methods}))
    # what a user gets running four flows from the repository root: one PREFECT_HOME (here a fresh one)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(MLFLOW_TRACKING_URI=store, PREFECT_HOME=str(tmp_path / "prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DISTILLERY_CHECKPOINTS=str(tmp_path / "ckpt"),
               PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}")
    procs, t0 = [], time.monotonic()
    try:
        for name in METHODS:
            with open(tmp_path / f"{name}.log", "w") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, __file__, name, str(params), str(tmp_path / f"{name}.json")],
                    cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        stop(procs)
        left = stop_leftovers(tmp_path)
    elapsed = time.monotonic() - t0
    logs = {n: (tmp_path / f"{n}.log").read_text() for n in METHODS}
    assert codes == [0] * 4, "\n".join(f"--- {n} exited {c}\n{logs[n][-4000:]}"
                                       for n, c in zip(METHODS, codes))
    assert not left, f"left running: {left}"  # each flow stopped its ephemeral Prefect server

    client = MlflowClient(store)
    counts, problems = Counter(), []
    for name in METHODS:
        recorded, expected, wrong = records(client, name, json.loads((tmp_path / f"{name}.json").read_text()))
        counts.update({f"{k} recorded": v for k, v in recorded.items()})
        counts.update({f"{k} expected": v for k, v in expected.items()})
        problems += [f"{name}: {w}" for w in wrong]
    kinds = ("runs", "metric keys", "epoch points", "model versions", "champions")
    summary = ", ".join(f"{k} {counts[k + ' recorded']}/{counts[k + ' expected']}" for k in kinds)
    print(f"\n4 flows at once in {elapsed:.0f} s; recorded/expected: {summary}")
    assert not problems and all(counts[k + " recorded"] == counts[k + " expected"] for k in kinds), \
        f"{summary}\n" + "\n".join(problems)

    # Prefect: the four flows on the one PREFECT_HOME completed, and no step needed a retry (a retry
    # hides a race that a busier machine loses)
    with contextlib.closing(sqlite3.connect(tmp_path / "prefect" / "prefect.db")) as db:
        flows = db.execute("SELECT state_type FROM flow_run").fetchall()
        retries = db.execute("SELECT count(*) FROM task_run_state WHERE name = 'AwaitingRetry'").fetchone()[0]
    failures = sorted({line.split(" - ", 1)[-1][:200] for text in logs.values() for line in text.splitlines()
                       if "Task run failed with exception" in line})
    assert flows == [("COMPLETED",)] * 4 and retries == 0, f"{retries} retries:\n" + "\n".join(failures)


def records(client, name, report):
    """What one method's flow recorded in MLflow against what its plan expects: counts of runs (each
    FINISHED, under the flow's parent run), metric keys, per-epoch points, model versions and
    champion aliases; and a line for each thing missing, extra or wrong."""
    recorded, expected, wrong = Counter(), Counter(), []
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    by_role = expected_runs()
    roles = Counter(r.data.tags["distillery.role"] for r in runs)
    if roles != by_role:
        wrong.append(f"runs by role {dict(roles)}, expected {dict(by_role)}")
    parent = next(r.info.run_id for r in runs if r.data.tags["distillery.role"] == "flow")
    # FINISHED, and under the flow's run unless it is that run
    recorded["runs"] = sum(r.info.status == "FINISHED" and r.data.tags.get("mlflow.parentRunId")
                           == (None if r.info.run_id == parent else parent) for r in runs)
    expected["runs"] = sum(by_role.values())

    for r in runs:
        keys = expected_metric_keys(r.data.tags["distillery.role"])
        recorded["metric keys"] += len(keys & set(r.data.metrics))
        expected["metric keys"] += len(keys)
        if "train_loss" in keys:  # one point per epoch, none lost, none twice
            steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, "train_loss"))
            recorded["epoch points"] += len(steps)
            expected["epoch points"] += TRAIN["epochs"]
            if steps != list(range(1, TRAIN["epochs"] + 1)):
                wrong.append(f"{r.info.run_name}: train_loss at epochs {steps}")

    for model, role in ((name, "student_kd"), (f"{name}_teacher", "teacher")):
        versions = client.search_model_versions(f"name='{model}'")
        recorded["model versions"] += len(versions)
        expected["model versions"] += 1
        champion = client.get_model_version_by_alias(model, "champion")
        recorded["champions"] += 1
        expected["champions"] += 1
        if not (str(champion.version) == str(report["mlflow"]["registry"][role]["version"]) == "1"
                and client.get_run(champion.run_id).info.experiment_id == exp.experiment_id):
            wrong.append(f"{model}@champion is version {champion.version} of run {champion.run_id}")
    return recorded, expected, wrong


def expected_runs():
    """Runs by role, from the method's plan: the flow's parent run, one per trained job, one per
    non-learned baseline (the seam kind composes nothing, so no composed runs)."""
    from tasks.kinds import get_kind
    from tasks.methods import TRAINED_BASELINES, get_method
    from tasks.steps.plan import plan
    spec = get_method("seam_sine")  # every seam_<x> is this declaration under another name
    kind = get_kind(spec.kind)
    assert not kind.composes
    jobs = plan(spec, SEEDS, lambda role: kind.units(spec, role), kind.compositions(spec)).jobs
    return Counter({"flow": 1, **Counter(j.role for j in jobs),
                    **{b: 1 for b in spec.baselines if b not in TRAINED_BASELINES}})


def expected_metric_keys(role):
    """What each run must hold: per-epoch losses and validation and the test score on a trained run,
    the test score on a baseline's, the claim and each role's summary on the parent."""
    if role == "flow":
        roles = ("teacher", "student_kd", "student_labels", "mean")
        return {"claim_holds", "claim.0.diff_mean", "claim.0.ci95_low", "claim.0.ci95_high",
                "claim.1.diff_mean", *(f"{r}.mse_{s}" for r in roles for s in ("mean", "std"))}
    if role == "mean":
        return {"test_mse"}
    losses = {"train_loss_seam_kd"} if role == "student_kd" else {"train_loss_seam_mse"}
    return {"train_loss", "epoch_seconds", "val_mse", "test_mse", *losses}



# ---------------------------------------------------------------------------------------------------
# two pipelines at once in one checkout

HOLD = """import pathlib, time
pathlib.Path("holding").touch()  # tells the test the stage runs
while not pathlib.Path("release").exists():
    time.sleep(0.1)
pathlib.Path("out.txt").write_text("done")
"""
DVC = str(Path(sys.executable).parent / "dvc")
MAKE_RUN = [sys.executable, "-m", "flows.repro"]  # what `make run` runs


@pytest.fixture
def held_checkout(tmp_path):
    """A copy of this checkout whose pipeline is one stage that runs until the test releases it."""
    from conftest import copy_checkout
    root = copy_checkout(tmp_path / "repo")
    (root / "dvc.lock").unlink()
    (root / "hold.py").write_text(HOLD)
    (root / "dvc.yaml").write_text(yaml.safe_dump(
        {"stages": {"hold": {"cmd": "python hold.py", "deps": ["hold.py"], "outs": ["out.txt"]}}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "PYTHONPATH"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@localhost")
    subprocess.run("git init -q && git add -A && git commit -qm held", shell=True, cwd=root, env=env,
                   check=True)
    return root, env


def snapshot(root):
    """Every file of the checkout (content and mtime) but git's and DVC's own run-time state: DVC
    and a refused `dvc repro` both open their lock files in .dvc/tmp."""
    import hashlib
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith((".git/", ".dvc/tmp/")):
            continue
        if p.is_file():
            out[rel] = (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        else:
            out[rel] = "dir"
    return out


def wait_for(path, proc, log, timeout=240):
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() - t0 < timeout, log.read_text()[-3000:]
        time.sleep(0.2)


def test_second_dvc_repro_fails_at_once_and_changes_nothing(held_checkout, tmp_path):
    """`make run` or plain `dvc repro` runs a stage; a second `make run` exits 1 within seconds with one
    line naming the first, before starting a Prefect server, and a second plain `dvc repro` meets
    DVC's lock on the running stage; neither changes a file. The first `make run` is then stopped
    like a job (SIGTERM to its group: its server goes too), the first `dvc repro` completes."""
    root, env = held_checkout
    timings = []
    for i, first_cmd in enumerate((MAKE_RUN, [DVC, "repro"])):
        for f in ("holding", "release"):
            (root / f).unlink(missing_ok=True)
        log = tmp_path / f"first{i}.log"
        with open(log, "w") as fh:
            first = subprocess.Popen(first_cmd, cwd=root, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            wait_for(root / "holding", first, log)
            before = snapshot(root)
            holder = "python -m flows.repro" if first_cmd is MAKE_RUN else f"{DVC} repro"
            for second in (MAKE_RUN, [DVC, "repro"]):
                t0 = time.monotonic()
                proc = subprocess.run(second, cwd=root, env=env, capture_output=True, text=True, timeout=120)
                took = time.monotonic() - t0
                timings.append(f"{name(first_cmd)}, then {name(second)}: "
                               f"exit {proc.returncode} in {took:.1f} s")
                assert proc.returncode != 0 and took < 10, (timings[-1], proc.stdout, proc.stderr)
                if second is MAKE_RUN:
                    assert proc.stdout == "" and proc.stderr.splitlines() == [
                        f"error: {root}: another `dvc repro` is running in this checkout "
                        f"(pid {first.pid}: {holder}); wait for it or stop it"]
                else:  # DVC's own words
                    assert f"'{root}/out.txt' is busy, it is being blocked by" in proc.stderr
                assert snapshot(root) == before, f"{second} changed the checkout"
            if first_cmd is MAKE_RUN:
                os.killpg(first.pid, signal.SIGTERM)
                assert first.wait(timeout=60) == 128 + signal.SIGTERM, log.read_text()[-3000:]
            else:
                (root / "release").touch()
                assert first.wait(timeout=120) == 0, log.read_text()[-3000:]
        finally:
            stop([first])
            left = stop_leftovers(tmp_path)
        assert not left, f"left running: {left}"
    assert (root / "out.txt").read_text() == "done" and "hold" in (root / "dvc.lock").read_text()
    print("\n" + "\n".join(timings))


def name(cmd):
    return "make run" if cmd is MAKE_RUN else "dvc repro"


def stop(procs):
    """Ends what a test started, by PID: its process group (the flow and its Prefect server)."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def stop_leftovers(tmp, wait=10.0):
    """Kills, by PID, what a test started that still runs after up to `wait` s (e.g. an orphaned
    Prefect server): processes working in `tmp` or keeping their Prefect state there. Returns them."""
    import psutil

    def inside(path):
        return bool(path) and Path(path).is_relative_to(tmp)

    def running():
        out = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.status() != psutil.STATUS_ZOMBIE and (inside(p.cwd())
                                                           or inside(p.environ().get("PREFECT_HOME"))):
                    out.append(p)
        return out

    t0 = time.monotonic()
    while running() and time.monotonic() - t0 < wait:
        time.sleep(0.5)
    left = []
    for p in running():
        with contextlib.suppress(psutil.Error):
            left.append(f"{p.pid}: {' '.join(p.cmdline())}")
            p.kill()
    return left


HOLDER = """import pathlib, sys, time
from flows.repro import checkout_lock
with checkout_lock(pathlib.Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_make_run_refuses_while_dvc_holds_its_lock_and_a_killed_run_blocks_nothing(held_checkout):
    """While DVC holds its repository lock (planning or recording stages) `make run` refuses at once;
    a `make run` killed with SIGKILL leaves its lock to the kernel, so the next one is not blocked."""
    import zc.lockfile

    from flows.repro import checkout_lock
    from tasks.platform.common import StageError
    root, env = held_checkout
    (root / ".dvc" / "tmp").mkdir(exist_ok=True)
    held = zc.lockfile.LockFile(str(root / ".dvc" / "tmp" / "lock"))  # DVC's lock, as `dvc repro` takes it
    try:
        proc = subprocess.run(MAKE_RUN, cwd=root, env=env, capture_output=True, text=True, timeout=60)
    finally:
        held.close()
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        f"error: {root}: another `dvc repro` is running in this checkout (pid {os.getpid()}: dvc); "
        "wait for it or stop it"]

    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], cwd=root, env=env,
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(StageError, match=f"pid {holder.pid}: python -m flows.repro"):
            with checkout_lock(root):
                pass
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=10)
        with checkout_lock(root):
            pass
    finally:
        stop([holder])


if __name__ == "__main__":
    flow_process(sys.argv[1:])
