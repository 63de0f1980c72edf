"""`distillery reproduce RUN_ID`: does a recorded run come out the same when rerun from its lineage?

A run of a role and seed carries its lineage (tasks/platform/lineage.py): the commit it ran from, the
data directory and its sha256, the md5 that dvc.lock gave that directory. Reproducing it:

1. a temporary `git worktree` of this repository at that commit (never the user's checkout);
2. the method's inputs checked out there from this checkout's DVC cache as that commit's dvc.lock
   records them, or as the run's own `distillery.dvc_lock_md5` does where the two differ (`dvc pull`
   when the cache lacks them and a remote is configured), and hashed: they must be the bytes the run
   was trained on, or nothing is rerun;
3. the method's flow rerun there, into an SQLite tracking store of its own in the temporary
   directory, so the user's experiments see nothing of it;
4. every `test_*` metric of the run (but timings, `*latency_ms`) against the rerun's run of the same role, seed and unit, within
   the run's `distillery.reproduce_tolerance` tag (absolute; DEFAULT_TOLERANCE without one).

The worktree and the temporary directory are removed whatever happens, Ctrl-C and SIGTERM included
(`cli_main` turns SIGTERM into an exception, so `finally` runs; the flow's process is stopped first).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from .common import StageError, hash_path

DEFAULT_TOLERANCE = 1e-6
TAG = "distillery."
TOLERANCE_TAG = f"{TAG}reproduce_tolerance"
# the run parameters that may differ between two faithful runs (the device is chosen per machine)
MACHINE_PARAMS = {"device"}
Log = Callable[[str], None]


@dataclass(frozen=True)
class RecordedRun:
    """What the tracking store says about the run to reproduce."""
    run_id: str
    method: str
    role: str
    seed: int
    unit: str                # the unit a training run belongs to, or the units a composed run joins
    commit: str
    dirty: bool
    data_dir: str
    data_sha256: str
    dvc_lock_md5: str        # what dvc.lock said of data_dir when the run started ("none": not a DVC output)
    tolerance: float
    metrics: dict[str, float]            # test_* only
    params: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.method} {self.role}{unit} seed {self.seed} at {self.commit[:12]}"


@dataclass(frozen=True)
class Comparison:
    metric: str
    recorded: float
    reproduced: float | None     # None: the rerun did not record it

    @property
    def diff(self) -> float | None:
        return None if self.reproduced is None else abs(self.reproduced - self.recorded)


@dataclass(frozen=True)
class Reproduction:
    recorded: RecordedRun
    rerun_id: str
    comparisons: list[Comparison]
    params_changed: dict[str, tuple[str | None, str | None]]   # name -> (recorded, rerun)

    def ok(self, c: Comparison) -> bool:
        return c.diff is not None and c.diff <= self.recorded.tolerance

    @property
    def matches(self) -> bool:
        return all(self.ok(c) for c in self.comparisons)

    def summary(self) -> str:
        n, tol = len(self.comparisons), f"{self.recorded.tolerance:g}"
        if self.matches:
            return f"match: all {n} test metrics of {self.recorded.describe()} reproduced within {tol}"
        bad = [c for c in self.comparisons if not self.ok(c)]
        worst = max(bad, key=lambda c: float("inf") if c.diff is None else c.diff)
        how = "missing from the rerun" if worst.diff is None else f"|diff| {worst.diff:.4g}"
        changed = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in self.params_changed.items())
        return (f"MISMATCH: {len(bad)} of {n} test metrics beyond {tol} (worst {worst.metric}, {how})"
                + (f"; params differ: {changed}" if changed else ""))


COMPARISON_HEADER = ["metric", "recorded", "reproduced", "|diff|", "ok"]


def comparison_rows(result: Reproduction) -> list[list[str]]:
    def num(x: float | None) -> str:
        return "—" if x is None else repr(x)
    return [[c.metric, num(c.recorded), num(c.reproduced), "—" if c.diff is None else f"{c.diff:.3g}",
             "yes" if result.ok(c) else "NO"] for c in result.comparisons]


# ---------------------------------------------------------------------------------------------------
# the whole thing

def reproduce(run_id: str, tracking_uri: str, repo: str | os.PathLike = ".",
              log: Log = lambda _: None) -> Reproduction:
    recorded = recorded_run(tracking_uri, run_id)
    root = repo_root(repo)
    check_commit(root, recorded)
    log(f"reproducing run {run_id}: {recorded.describe()}, data {recorded.data_dir}")
    if recorded.dirty:
        log(f"warning: run {run_id} ran with uncommitted changes on top of {recorded.commit[:12]}; "
            f"the rerun uses the commit as it is")
    with worktree(root, recorded.commit) as wt:
        restore_inputs(root, wt, recorded, log)
        store = f"sqlite:///{wt.parent / 'mlflow.db'}"
        rerun_flow(wt, recorded.method, store, log)
        rerun = rerun_run(store, recorded)
    comparisons = [Comparison(k, v, rerun.data.metrics.get(k)) for k, v in sorted(recorded.metrics.items())]
    return Reproduction(recorded, rerun.info.run_id, comparisons,
                        changed_params(recorded.params, rerun.data.params))


# ---------------------------------------------------------------------------------------------------
# the recorded run

def recorded_run(tracking_uri: str, run_id: str) -> RecordedRun:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from .leaderboard import store_exists
    from .tracking import redact
    where = redact(tracking_uri)
    if not store_exists(tracking_uri):
        raise StageError(where, "no MLflow store here (set MLFLOW_TRACKING_URI, or run from the checkout)")
    try:
        run = MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException:
        raise StageError(where, f"no run {run_id!r} in this tracking store") from None
    tags = own_tags(run)
    role = tags.get("role")
    if role is None or "method" not in tags:
        raise StageError(where, f"run {run_id} has no {TAG}role and {TAG}method tags: not a method's run")
    if role == "flow":
        raise StageError(where, f"run {run_id} is {tags['method']}'s flow (parent) run; reproduce one of its "
                                f"role runs (`distillery compare --run-ids` lists them)")
    # a latency times the machine it ran on, not what training produced: reported by compare, not reproduced
    metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("test_") and not k.endswith("latency_ms")}
    if not metrics:
        raise StageError(where, f"run {run_id} ({role}) has no test_* metrics to compare: a unit of a "
                                f"composed model? Reproduce the composed run (see `compare --run-ids`)")
    commit = tags.get("git_commit", "unknown")
    if commit == "unknown":
        raise StageError(where, f"run {run_id} records no commit ({TAG}git_commit): it did not run from a "
                                f"git checkout, so there is nothing to check out")
    return RecordedRun(run_id=run_id, method=tags["method"], role=role, seed=int(tags.get("seed", 0)),
                       unit=unit_of(tags), commit=commit, dirty=tags.get("git_dirty") == "true",
                       data_dir=tags.get("data_dir", ""), data_sha256=tags.get("data_sha256", ""),
                       dvc_lock_md5=tags.get("dvc_lock_md5", "none"),
                       tolerance=tolerance(tags.get(TOLERANCE_TAG[len(TAG):]), f"{where}: run {run_id}"),
                       metrics=metrics, params=dict(run.data.params))


def own_tags(run: Any) -> dict[str, str]:
    """The run's `distillery.*` tags, without the prefix."""
    return {k[len(TAG):]: v for k, v in run.data.tags.items() if k.startswith(TAG)}


def unit_of(tags: dict[str, str]) -> str:
    """A training run's unit (a forecast's lead-time model), or the units a composed run joins."""
    return tags.get("unit") or tags.get("units") or ""


def tolerance(tag: str | None, where: str) -> float:
    """The run's absolute tolerance for its test metrics, DEFAULT_TOLERANCE when it names none."""
    if tag is None:
        return DEFAULT_TOLERANCE
    try:
        value = float(tag)
    except ValueError:
        raise StageError(where, f"tag {TOLERANCE_TAG} is not a number: {tag!r}") from None
    if not value >= 0:
        raise StageError(where, f"tag {TOLERANCE_TAG} must be >= 0, got {tag!r}")
    return value


def changed_params(recorded: dict[str, str], rerun: dict[str, str]) -> dict[str, tuple[str | None, ...]]:
    """The logged run params (model, training config, loss terms, parameter count) that differ: when
    metrics do not match, the first thing to look at (e.g. a run made with --set-param overrides)."""
    return {k: (recorded.get(k), rerun.get(k)) for k in sorted(set(recorded) | set(rerun))
            if k not in MACHINE_PARAMS and recorded.get(k) != rerun.get(k)}


# ---------------------------------------------------------------------------------------------------
# git

def _git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=check)


def repo_root(path: str | os.PathLike) -> Path:
    try:
        return Path(_git(Path(path), "rev-parse", "--show-toplevel").stdout.strip())
    except (subprocess.CalledProcessError, FileNotFoundError):
        raise StageError(path, "not inside a git repository: the run's commit is checked out of it") from None


def check_commit(root: Path, recorded: RecordedRun) -> None:
    if _git(root, "cat-file", "-e", f"{recorded.commit}^{{commit}}", check=False).returncode:
        raise StageError(root, f"commit {recorded.commit} (run {recorded.run_id}'s {TAG}git_commit) is not "
                               f"in this repository; fetch it, or run from the clone the run came from")


@contextlib.contextmanager
def worktree(root: Path, commit: str) -> Iterator[Path]:
    """A detached worktree of `commit` in a new temporary directory; both removed on the way out."""
    tmp = Path(tempfile.mkdtemp(prefix="distillery-reproduce-"))
    wt = tmp / "repo"
    try:
        _git(root, "worktree", "add", "--quiet", "--detach", str(wt), commit)
        yield wt
    finally:
        if wt.exists():
            _git(root, "worktree", "remove", "--force", str(wt), check=False)
        shutil.rmtree(tmp, ignore_errors=True)
        _git(root, "worktree", "prune", check=False)   # in case `remove` failed half-way


# ---------------------------------------------------------------------------------------------------
# data

def _dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode:
        last = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}").splitlines()[-1]
        raise StageError(cwd, f"dvc {' '.join(args)}: {last}")
    return proc


def method_data(wt: Path, method: str) -> str:
    """`methods.<method>.data` in the commit's params.yaml: the directory the flow will read."""
    params = yaml.safe_load((wt / "params.yaml").read_text()) or {}
    data = ((params.get("methods") or {}).get(method) or {}).get("data")
    if not data:
        raise StageError("params.yaml", f"methods.{method}.data: not in the run's commit")
    return str(data)


def restore_inputs(root: Path, wt: Path, recorded: RecordedRun, log: Log) -> None:
    """Checks out the method's data in the worktree, from this checkout's DVC cache (or its remote),
    and makes sure it is the data the run read (its sha256)."""
    data = method_data(wt, recorded.method)
    if recorded.data_dir and data.rstrip("/") != recorded.data_dir.rstrip("/"):
        raise StageError(f"{recorded.commit[:12]}:params.yaml",
                         f"methods.{recorded.method}.data is {data}, but run {recorded.run_id} read "
                         f"{recorded.data_dir}: it ran with other params than the commit's")
    md5 = pin_recorded_md5(wt, data, recorded, log)
    cache = _dvc(root, "cache", "dir").stdout.strip()
    local = root / ".dvc" / "config.local"   # the user's own remotes and credentials, never committed
    if local.is_file():
        shutil.copy2(local, wt / ".dvc" / "config.local")
    _dvc(wt, "cache", "dir", "--local", cache)
    if _dvc(wt, "checkout", data, check=False).returncode:
        if not _dvc(wt, "remote", "list").stdout.strip():
            raise StageError(data, f"not in the DVC cache {cache} (md5 {md5}), and no DVC remote is "
                                   f"configured to pull it from")
        log(f"{data}: not in the DVC cache; dvc pull")
        _dvc(wt, "pull", data)
    restored = hash_path(wt / data)
    if recorded.data_sha256 and restored != recorded.data_sha256:
        raise StageError(data, f"restored (md5 {md5}) with sha256 {restored[:12]}…, but run "
                               f"{recorded.run_id} read {recorded.data_sha256[:12]}…: not the same inputs")
    log(f"{data}: restored from {cache} (sha256 {restored[:12]}…, as recorded)")


def pin_recorded_md5(wt: Path, data: str, recorded: RecordedRun, log: Log) -> str | None:
    """Points the worktree's dvc.lock at the md5 the run recorded when the commit's lock says
    otherwise, and returns the md5 to check out. `dvc repro` rewrites dvc.lock stage by stage and a
    method often trains before anyone commits the new lock, so the run's own tag is the better
    record of what it read."""
    from .lineage import dvc_lock_md5
    committed = dvc_lock_md5(data, wt / "dvc.lock")
    if recorded.dvc_lock_md5 in ("", "none") or recorded.dvc_lock_md5 == committed:
        return committed
    if committed is None:
        raise StageError(f"{recorded.commit[:12]}:dvc.lock",
                         f"no output {data}: the commit's DVC pipeline does not produce the method's data")
    lock_file = wt / "dvc.lock"
    lock = yaml.safe_load(lock_file.read_text())
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            if out.get("path", "").rstrip("/") == data.rstrip("/"):
                out["md5"] = recorded.dvc_lock_md5
                for stale in ("size", "nfiles"):   # the committed version's; DVC reads them from the cache
                    out.pop(stale, None)
    lock_file.write_text(yaml.safe_dump(lock, sort_keys=False))
    log(f"{data}: the commit's dvc.lock records md5 {committed}, the run read {recorded.dvc_lock_md5} "
        f"(its {TAG}dvc_lock_md5): restoring what the run read")
    return recorded.dvc_lock_md5


# ---------------------------------------------------------------------------------------------------
# the rerun

def rerun_flow(wt: Path, method: str, store: str, log: Log) -> None:
    """`python -m flows.method <method>` in the worktree, on the worktree's code (PYTHONPATH), into
    `store`, on a Prefect ephemeral API of its own; its output goes to a log whose tail is shown
    when it fails. Stopped with the caller (Ctrl-C, SIGTERM)."""
    # the user's servers, stores and checkpoints are not the rerun's: a checkpoint left by an
    # interrupted run of the same unit would be resumed instead of trained from scratch
    own = ("PREFECT_API", "PREFECT_HOME", "MLFLOW_", "DISTILLERY_CHECKPOINTS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(own)}
    env.update(MLFLOW_TRACKING_URI=store, PYTHONPATH=str(wt), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    flow_log = wt.parent / "flow.log"
    log(f"rerunning {method} in {wt} (tracking {store})")
    with open(flow_log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.method", method,
                                 "--report", str(wt.parent / "report.json")],
                                cwd=wt, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            code = proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if code:
        tail = flow_log.read_text(errors="replace").splitlines()[-30:]
        for line in tail:
            log(f"  | {line}")
        raise StageError(f"python -m flows.method {method}",
                         f"the rerun failed (exit {code}); its last lines are above")


def rerun_run(store: str, recorded: RecordedRun) -> Any:
    """The rerun's finished run of the recorded run's role, seed and unit that holds test metrics."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = (f"tags.`{TAG}role` = '{recorded.role}' and tags.`{TAG}seed` = '{recorded.seed}' "
             f"and attributes.status = 'FINISHED'")
    runs = client.search_runs(experiments, query, order_by=["attributes.start_time DESC"], max_results=1000)
    same = [r for r in runs if any(k.startswith("test_") for k in r.data.metrics)
            and unit_of(own_tags(r)) == recorded.unit]
    if not same:
        raise StageError(store, f"the rerun recorded no finished {recorded.role} run of seed {recorded.seed} "
                                f"with test metrics (its method's roles or seeds changed since?)")
    return same[0]
