"""Kill `make run` with SIGKILL at seeded random moments, rerun it, and check that nothing was lost.

    python benchmarks/kill_trials.py [--trials 20] [--seed 0] [--methods hinton_kd pangu]
                                     # writes benchmarks/results/kill_trials.json

The pipeline is `python -m flows.repro` (what `make run` runs) in a copy of this checkout, on a small
profile: digits, the synthetic ERA5 profile over 10 days (download, prepare) and the methods named
(hinton_kd and pangu by default; two seeds, few epochs), so that a run takes a minute or two and
still passes every kind of stage. Each trial changes the data seeds, so every stage has work, starts
the pipeline as a process group of its own, SIGKILLs the whole group (`make`, `dvc`, the stage, the
flow: a crash or the OOM killer) at a moment drawn uniformly from [0, T), reruns it, and checks:
  - the rerun exits 0
  - every artefact passes its validation (digits splits, raw and prepared ERA5, metrics/*.json)
  - `dvc status` is clean, and no temporary output is left beside any output
  - MLflow: no run left RUNNING; no run registered twice as a version of one model
  - no process of the killed run is left (its Prefect server is stopped by the rerun)
T is the latest full run's duration: a second uninterrupted run at first (the first also creates the
stores), then each killed run's time before the kill plus its rerun, so the moments follow the
machine's speed when other work shares it.

tests/test_kill_trials.py runs the same trials, fewer of them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from checkout import copy_checkout

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "kill_trials.json"
METHODS = ("hinton_kd", "pangu")


def small_params(params: dict[str, Any], trial: int, methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """The checkout's params on the small profile, with data seeds that differ per trial."""
    p = json.loads(json.dumps(params))
    p["digits"]["seed"] = trial
    p["era5_profiles"] = ["default"]
    p["era5"]["default"].update(n_days=10)
    p["era5"]["default"]["synthetic"]["seed"] = trial
    # the video and point-cloud data stages at a tenth of their size: their kill-safety is the same
    p["video_profiles"] = p["pointcloud_profiles"] = ["default"]
    p["video"]["default"]["generate"].update(n_videos=10, pretrain_clips_per_class=8, background_clips=4)
    p["scans"]["default"]["generate"].update(n_scenes=12)
    p["voxelize"]["default"]["real_frames"] = None
    small = {"hinton_kd": {"seeds": [0, 1], "teacher": {"epochs": 3}, "student": {"epochs": 3}},
             "pangu": {"seeds": [0, 1], "teacher": {"epochs": 2}}}
    p["methods"] = {m: p["methods"][m] for m in methods}
    for m in methods:
        for key, value in small[m].items():
            if isinstance(value, dict):
                p["methods"][m][key].update(value)
            else:
                p["methods"][m][key] = value
    return p


def make_checkout(root: Path) -> dict[str, str]:
    """Copies this checkout's tracked and untracked-not-ignored files to `root` and commits them (the
    lineage records a git commit); returns the environment the pipeline runs in."""
    copy_checkout(root)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               GIT_AUTHOR_NAME="kill", GIT_AUTHOR_EMAIL="kill@localhost",
               GIT_COMMITTER_NAME="kill", GIT_COMMITTER_EMAIL="kill@localhost")
    subprocess.run("git init -q && git add -A && git commit -qm kill-trials", shell=True, cwd=root, env=env,
                   check=True)
    return env


def set_trial(root: Path, trial: int, params: dict[str, Any], methods: tuple[str, ...]) -> None:
    (root / "params.yaml").write_text(yaml.safe_dump(small_params(params, trial, methods), sort_keys=False))


def start(root: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "flows.repro"], cwd=root, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # until every process of the group is dead and reaped
        reap()
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)


# The pipeline's processes outlive the one this script starts when it is killed (its `dvc` and stage
# processes die, its Prefect server does not). Orphans go to init, which on some machines (this VM's
# init among them) never reaps them: a killed `dvc` would stay a zombie, its pid "alive". As a child
# subreaper this script gets them instead, and reaps them.
PR_SET_CHILD_SUBREAPER = 36


def subreaper(on: bool) -> None:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)


def reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def processes_in(root: Path) -> list[int]:
    """Pids of processes running in the checkout (the pipeline, its stages and servers)."""
    import psutil
    out = []
    for p in psutil.process_iter(["pid", "cwd"]):
        cwd = p.info.get("cwd") or ""
        if cwd == str(root) or cwd.startswith(f"{root}/"):
            out.append(p.info["pid"])
    return out


def check(root: Path, env: dict[str, str], methods: tuple[str, ...]) -> dict[str, Any]:
    """The invariants after a rerun; raises AssertionError naming the first that fails."""
    from mlflow.tracking import MlflowClient

    from tasks.kinds.classification.schema import load_splits
    from tasks.kinds.forecast.schema import load_prepared, open_store
    from tasks.stages.era5_harmonise import check_raw

    load_splits(root / "data/digits", validate=True)
    load_prepared(root / "data/era5/default/prepared", validate=True)
    check_raw(open_store(root / "data/era5/default/raw.zarr", dask=True), "raw.zarr", 1)
    for m in methods:
        assert "claim" in json.loads((root / "metrics" / f"{m}.json").read_text()), m
    status = subprocess.run(["dvc", "status", "--json"], cwd=root, env=env, capture_output=True, text=True)
    assert status.returncode == 0 and json.loads(status.stdout or "{}") == {}, f"dvc status: {status.stdout}"
    leftovers = [str(p.relative_to(root)) for p in (root / "data").rglob(".*") if p.name.endswith((".tmp", ".old"))]
    assert not leftovers, f"temporary outputs left: {leftovers}"

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, max_results=5000)
    running = [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    assert not running, f"runs left RUNNING: {running}"
    versions = [(v.name, v.run_id) for m in client.search_registered_models()
                for v in client.search_model_versions(f"name='{m.name}'")]
    assert len(versions) == len(set(versions)), "a run registered twice as a version of one model"
    return {"runs": len(runs), "killed_runs": sum(r.info.status == "KILLED" for r in runs),
            "failed_runs": sum(r.info.status == "FAILED" for r in runs),
            "ended_by_next_start": sum("distillery.ended_by" in r.data.tags for r in runs),
            "model_versions": len(versions)}


def run_trials(work: Path, trials: int, seed: int, methods: tuple[str, ...] = METHODS,
               log=print) -> dict[str, Any]:
    subreaper(True)
    try:
        return _run_trials(work, trials, seed, methods, log)
    finally:
        for pid in processes_in(work / "repo"):  # a failed trial's pipeline or server, by pid
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subreaper(False)
        time.sleep(0.5)
        reap()


def _run_trials(work: Path, trials: int, seed: int, methods: tuple[str, ...], log) -> dict[str, Any]:
    root = work / "repo"
    root.mkdir(parents=True)
    if (REPO.parent / "shared").is_dir():
        (work / "shared").symlink_to(REPO.parent / "shared")
    env = make_checkout(root)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    pipeline_log = work / "pipeline.log"

    for data_seed in (1000, 1001):  # seeds no trial uses
        set_trial(root, data_seed, params, methods)
        t0 = time.monotonic()
        assert start(root, env, pipeline_log).wait() == 0, f"the uninterrupted run failed; see {pipeline_log}"
        full = time.monotonic() - t0
        log(f"uninterrupted run: {full:.1f} s")
    uninterrupted = full

    rng = random.Random(seed)
    results = []
    for trial in range(1, trials + 1):
        set_trial(root, trial, params, methods)
        moment = rng.uniform(0, full)
        proc = start(root, env, pipeline_log)
        time.sleep(moment)
        finished_first = proc.poll() is not None
        killed_at_stage = _current_stage(root)
        kill_group(proc)
        t1 = time.monotonic()
        rerun = start(root, env, pipeline_log)
        rc = rerun.wait()
        took = time.monotonic() - t1
        assert rc == 0, f"trial {trial}: the rerun exited {rc}; see {pipeline_log}"
        counts = check(root, env, methods)
        reap()
        left = processes_in(root)
        assert not left, f"trial {trial}: processes left in the checkout: {left}"
        if not finished_first:
            full = moment + took  # the machine's speed now, for the next trial's moment
        row = {"trial": trial, "killed_after_s": round(moment, 2), "stage": killed_at_stage,
               "already_done": finished_first, "rerun_s": round(took, 1), **counts}
        results.append(row)
        log(f"trial {trial:2d}: SIGKILL at {moment:5.1f} s ({killed_at_stage or '-'}), rerun {took:5.1f} s, "
            f"runs {counts['runs']}, KILLED by the next start {counts['ended_by_next_start']}, "
            f"versions {counts['model_versions']}: ok")
    return {"trials": trials, "survived": len(results), "seed": seed, "methods": list(methods),
            "uninterrupted_s": round(uninterrupted, 1),
            "rows": results}


def _current_stage(root: Path) -> str | None:
    """What the pipeline was writing when killed: the outputs DVC had locked (from its rwlock)."""
    try:
        rwlock = json.loads((root / ".dvc/tmp/rwlock").read_text())
    except (OSError, ValueError):
        return None
    outs = [str(Path(path).relative_to(root)) if path.startswith(str(root)) else path
            for path in rwlock.get("write", {})]
    return ", ".join(sorted(outs)) or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kill-trials-") as tmp:
        result = run_trials(Path(tmp), args.trials, args.seed, tuple(args.methods))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'trial':>5} {'kill at s':>9} {'stage':<28} {'rerun s':>7} {'runs':>5} {'ended':>5} {'versions':>8}")
    for r in result["rows"]:
        print(f"{r['trial']:>5} {r['killed_after_s']:>9} {str(r['stage'])[:28]:<28} {r['rerun_s']:>7} "
              f"{r['runs']:>5} {r['ended_by_next_start']:>5} {r['model_versions']:>8}")
    killed = sum(not r["already_done"] for r in result["rows"])
    print(f"survived {result['survived']} of {result['trials']} ({killed} killed mid-run; methods "
          f"{', '.join(result['methods'])}; uninterrupted run {result['uninterrupted_s']} s)")


if __name__ == "__main__":
    main()
