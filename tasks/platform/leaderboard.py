"""The leaderboard: each method's latest finished flow run, read back from MLflow, as rows that
`distillery compare` prints and `distillery report` renders.

The source is the method's experiment: its latest FINISHED parent run (tag `distillery.role` = flow)
and that run's `report.json` artifact (tasks/steps/report.py), which holds every role's primary
metric per seed, the claim's verdict and parts, every metric's seed mean and the run of each
(role, seed). A parent run without a readable one (its artifacts gone or unreachable, a report of an
older shape) is rebuilt from its child runs' `test_<primary metric>` and its own claim tags and metrics.
Each role's 95% interval is the Student-t interval of the mean over seeds that the claims use
(tasks/steps/claims.py); a role with one value (a deterministic baseline) has none.
"""
from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .common import StageError, read_json

# MLflow draws a progress bar for every artifact download (each report.json, each figure)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

FLOW_ROLE = "flow"
ROLE_TAG, SEED_TAG = "distillery.role", "distillery.seed"
ROLE_ORDER = ("teacher", "student_kd", "student_labels")  # then the kind's baselines, by name
# what a method measures about its models' cost rather than their skill (e.g. detection's counted
# backbone FLOPs and CPU latency, TernGrad's bytes sent per step)
COST_METRIC = re.compile(r"(flops|latency_ms|bytes_per_step)$")
NOT_RUN = "not run"


@dataclass(frozen=True)
class RoleScore:
    """One role of a method: its primary metric on the test split, one value per seed."""
    role: str
    values: dict[int, float]                                # seed -> value, ascending seeds
    run_ids: dict[int, str] = field(default_factory=dict)   # seed -> the run that holds the value
    costs: dict[str, float] = field(default_factory=dict)   # cost metric -> seed mean

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        from ..steps.claims import summarize
        return summarize(list(self.values.values()))["mean"]

    @property
    def ci95(self) -> tuple[float, float] | None:
        from ..steps.claims import t_interval
        return t_interval(list(self.values.values()))


@dataclass(frozen=True)
class MethodResult:
    """A method's latest finished flow run, or `parent_run_id` None when it has none."""
    method: str
    primary_metric: str | None = None
    higher_is_better: bool | None = None
    roles: list[RoleScore] = field(default_factory=list)
    claim: dict[str, Any] | None = None   # statement, verdict, counts, parts (tasks/steps/claims.py)
    parent_run_id: str | None = None
    experiment_id: str | None = None
    git_commit: str | None = None
    source: str = NOT_RUN                 # "report.json" or "child runs"

    @property
    def ran(self) -> bool:
        return self.parent_run_id is not None


# ---------------------------------------------------------------------------------------------------
# where the runs are

def tracking_uri(params_file: str | os.PathLike = "params.yaml") -> str:
    """MLFLOW_TRACKING_URI, else params.yaml › tracking (a relative SQLite path is the cwd's)."""
    from .tracking import resolve_tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return resolve_tracking_uri()
    from .params import load_params
    return resolve_tracking_uri(load_params(params_file).tracking.model_dump())


def store_exists(uri: str) -> bool:
    """False for an SQLite store whose file is not there (opening it would create an empty one)."""
    return not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).is_file()


def check_methods(names: list[str]) -> list[str]:
    """`names` (all declared methods when empty), or a StageError naming the first unknown one."""
    from ..methods import list_methods
    declared = list_methods()
    for name in names:
        if name not in declared:
            raise StageError("tasks/methods", f"unknown method {name!r}; declared: {', '.join(declared)}")
    return list(names) or declared


# ---------------------------------------------------------------------------------------------------
# reading the store

def collect(methods: list[str], uri: str) -> list[MethodResult]:
    """Each method's latest finished flow run in the store at `uri` (NOT_RUN when it has none)."""
    if not store_exists(uri):
        return [MethodResult(m) for m in methods]
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from .tracking import redact
    client = MlflowClient(uri)
    try:
        return [latest_result(client, m) for m in methods]
    except MlflowException as e:   # an unreachable server, a store of another MLflow version
        raise StageError(redact(uri), str(e).strip().splitlines()[0]) from None


def latest_result(client: Any, method: str) -> MethodResult:
    exp = client.get_experiment_by_name(method)
    if exp is None:
        return MethodResult(method)
    runs = client.search_runs([exp.experiment_id],
                              f"tags.`{ROLE_TAG}` = '{FLOW_ROLE}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return MethodResult(method)
    parent = runs[0]
    report = _report_artifact(client, parent.info.run_id)
    try:
        result = from_report(report, f"run {parent.info.run_id}: report.json")
    except (KeyError, TypeError, ValueError, StageError):   # none, or not in the shape this code writes
        result = from_child_runs(client, method, parent)
    return dataclasses.replace(result, method=method, parent_run_id=parent.info.run_id,
                               experiment_id=exp.experiment_id,
                               git_commit=parent.data.tags.get("distillery.git_commit"))


def _report_artifact(client: Any, run_id: str) -> dict[str, Any] | None:
    """The run's report.json, or None when it has none or its artifacts cannot be read."""
    from mlflow.exceptions import MlflowException
    try:
        if not any(a.path == "report.json" for a in client.list_artifacts(run_id)):
            return None
        with tempfile.TemporaryDirectory(prefix="distillery-report-") as tmp:
            return read_json(client.download_artifacts(run_id, "report.json", tmp), "the run's report")
    except (MlflowException, OSError, StageError):
        return None


def from_report(report: dict[str, Any] | None, where: str = "report.json") -> MethodResult:
    """A method's scores from its flow's report (tasks/steps/report.py `build_report`): each role's
    values are in ascending seed order, and its runs (`"<role>/seed<seed>"`) name those seeds."""
    if report is None:
        raise StageError(where, "missing")
    runs: dict[str, dict[int, str]] = {}
    for key, run_id in report["mlflow"]["runs"].items():
        role, _, seed = key.rpartition("/seed")
        runs.setdefault(role, {})[int(seed)] = run_id
    roles = []
    for role, summary in report["roles"].items():
        seeds = sorted(runs.get(role, {}))
        if len(seeds) != len(summary["values"]):
            raise StageError(where, f"roles.{role}: {len(summary['values'])} values, runs of seeds {seeds}")
        scores = report.get("scores", {}).get(role, {})
        roles.append(RoleScore(role, dict(zip(seeds, summary["values"])), {s: runs[role][s] for s in seeds},
                               {k: v for k, v in sorted(scores.items()) if COST_METRIC.search(k)}))
    return MethodResult(report["method"], report["primary_metric"], report["higher_is_better"],
                        sorted(roles, key=lambda r: role_rank(r.role)), report["claim"], source="report.json")


def from_child_runs(client: Any, method: str, parent: Any) -> MethodResult:
    """The same from the parent's child runs and its claim tags and metrics, for a parent run
    without a readable report.json. A training shared with another method's experiment is not a
    child here, so that role may be missing."""
    from ..methods import get_method
    spec = get_method(method)
    children = child_runs(client, parent.info.experiment_id, parent.info.run_id)
    by_role: dict[str, dict[int, tuple[float, str]]] = {}
    for run in children:
        value = run.data.metrics.get(f"test_{spec.primary_metric}")
        role, seed = run.data.tags.get(ROLE_TAG), run.data.tags.get(SEED_TAG)
        if value is not None and role and seed is not None:
            by_role.setdefault(role, {})[int(seed)] = (value, run.info.run_id)
    roles = [RoleScore(role, {s: v for s, (v, _) in sorted(per_seed.items())},
                       {s: rid for s, (_, rid) in sorted(per_seed.items())},
                       _cost_means(children, role))
             for role, per_seed in by_role.items()]
    return MethodResult(method, spec.primary_metric, spec.higher_is_better,
                        sorted(roles, key=lambda r: role_rank(r.role)), _claim_from_parent(parent),
                        source="child runs")


def child_runs(client: Any, experiment_id: str, parent_run_id: str) -> list[Any]:
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    return client.search_runs([experiment_id], query, max_results=5000)


def _cost_means(children: list[Any], role: str) -> dict[str, float]:
    values: dict[str, list[float]] = {}
    for run in children:
        if run.data.tags.get(ROLE_TAG) == role:
            for k, v in run.data.metrics.items():
                if k.startswith("test_") and COST_METRIC.search(k):
                    values.setdefault(k[len("test_"):], []).append(v)
    return {k: sum(v) / len(v) for k, v in sorted(values.items())}


def _claim_from_parent(parent: Any) -> dict[str, Any] | None:
    """The verdict as log_report put it on the parent run: tags `claim_verdict`, `claim.<i>`
    ("<statement>: <verdict>") and metrics `claim.<i>.diff_mean` / `ci95_low` / `ci95_high`."""
    tags, metrics = parent.data.tags, parent.data.metrics
    if "distillery.claim_verdict" not in tags:
        return None
    parts, i = [], 0
    while f"distillery.claim.{i}" in tags:
        statement, _, part_verdict = tags[f"distillery.claim.{i}"].rpartition(": ")
        low, high = metrics.get(f"claim.{i}.ci95_low"), metrics.get(f"claim.{i}.ci95_high")
        parts.append({"statement": statement, "verdict": part_verdict,
                      "diff_mean": metrics.get(f"claim.{i}.diff_mean"),
                      "ci95": None if low is None or high is None else [low, high]})
        i += 1
    counts = {v: sum(p["verdict"] == v for p in parts) for v in ("holds", "refuted", "inconclusive")}
    return {"statement": tags.get("distillery.claim", ""), "verdict": tags["distillery.claim_verdict"],
            "counts": counts, "parts": parts}


def run_figures(uri: str, result: MethodResult) -> list[tuple[str, bytes]]:
    """(title, PNG bytes) of what the flow already drew: the parent run's own figures (e.g. a
    forecast's RMSE against lead time; not its per-variable maps) and the learning curve of each
    role's first seed (every unit of it, e.g. a forecast teacher's 6 h and 24 h models). Logged
    PNGs are copied as they are, so a report costs downloads, not plotting. Figures are extras: an
    artifact that cannot be read ends the list there rather than the report."""
    from mlflow.exceptions import MlflowException
    figures: list[tuple[str, bytes]] = []
    if not result.ran:
        return figures
    try:
        for title, run_id, path in _figure_artifacts(uri, result):
            figures.append((title, _download(uri, run_id, path)))
    except (MlflowException, OSError):
        pass
    return figures


def _figure_artifacts(uri: str, result: MethodResult) -> Iterator[tuple[str, str, str]]:
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    for a in client.list_artifacts(result.parent_run_id):
        if a.path.endswith(".png"):
            yield f"{result.method}: {Path(a.path).stem}", result.parent_run_id, a.path
    children = child_runs(client, result.experiment_id, result.parent_run_id)
    for role in result.roles:
        if not role.values:
            continue
        seed = min(role.values)
        # the evaluated run (maybe a training shared from another experiment), and the unit runs
        # a composed model was built from
        runs = {role.run_ids[seed]: ""} if seed in role.run_ids else {}
        runs.update({r.info.run_id: r.data.tags.get("distillery.unit", "") for r in children
                     if r.data.tags.get(ROLE_TAG) == role.role and r.data.tags.get(SEED_TAG) == str(seed)})
        for run_id, unit in runs.items():
            if any(a.path == "learning_curve.png" for a in client.list_artifacts(run_id)):
                yield f"{role.role}, seed {seed}{f', {unit}' if unit else ''}: learning curve", run_id, \
                    "learning_curve.png"


def _download(uri: str, run_id: str, path: str) -> bytes:
    from mlflow.tracking import MlflowClient
    with tempfile.TemporaryDirectory(prefix="distillery-figure-") as tmp:
        return Path(MlflowClient(uri).download_artifacts(run_id, path, tmp)).read_bytes()


def role_rank(role: str) -> tuple[int, str]:
    return (ROLE_ORDER.index(role) if role in ROLE_ORDER else len(ROLE_ORDER), role)


# ---------------------------------------------------------------------------------------------------
# rows, for a terminal table and the HTML report alike

def number(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


def interval(ci: tuple[float, float] | list[float] | None) -> str:
    return "—" if ci is None else f"[{ci[0]:.4g}, {ci[1]:.4g}]"


def verdict_text(claim: dict[str, Any] | None) -> str:
    """"holds", or for a claim of several parts "refuted (2 hold, 1 refuted)"."""
    if claim is None:
        return "no claim recorded"
    counts = {v: n for v, n in claim.get("counts", {}).items() if n}
    if len(claim.get("parts", [])) <= 1:
        return claim["verdict"]
    if len(counts) == 1:
        return f"{claim['verdict']} ({len(claim['parts'])} of {len(claim['parts'])} parts)"
    def count(verdict: str, n: int) -> str:
        return f"{n} {'hold' if verdict == 'holds' and n > 1 else verdict}"   # "7 hold", "1 holds"
    return f"{claim['verdict']} ({', '.join(count(v, n) for v, n in counts.items())})"


LEADERBOARD_HEADER = ["method", "role", "metric", "n", "mean", "95% interval", "cost (seed mean)", "verdict"]


def leaderboard_rows(results: list[MethodResult]) -> list[list[str]]:
    """One row per (method, role); the method and its verdict on its first row; a method without a
    finished run is one NOT_RUN row."""
    rows = []
    for r in results:
        if not r.ran:
            rows.append([r.method, "—", "—", "", "", "", "", NOT_RUN])
            continue
        head = {"method": r.method, "metric": f"{r.primary_metric} {'↑' if r.higher_is_better else '↓'}",
                "verdict": verdict_text(r.claim)}
        for i, role in enumerate(r.roles):
            shown = head if i == 0 else dict.fromkeys(head, "")
            costs = ", ".join(f"{k} {v:.4g}" for k, v in role.costs.items())
            rows.append([shown["method"], role.role, shown["metric"], str(role.n), number(role.mean),
                         interval(role.ci95), costs, shown["verdict"]])
        if not r.roles:
            rows.append([head["method"], "—", head["metric"], "", "", "", "", head["verdict"]])
    return rows


CLAIM_HEADER = ["method", "claim", "verdict", "mean difference", "95% interval"]


def claim_rows(results: list[MethodResult]) -> list[list[str]]:
    """One row per claim part: its statement, verdict, mean paired difference and interval."""
    rows = []
    for r in results:
        for i, part in enumerate((r.claim or {}).get("parts", [])):
            rows.append([r.method if i == 0 else "", part["statement"], part["verdict"],
                         number(part.get("diff_mean")), interval(part.get("ci95"))])
    return rows


RUN_HEADER = ["method", "role", "seed", "value", "run id"]


def run_rows(results: list[MethodResult]) -> list[list[str]]:
    """The parent run and each (role, seed)'s run with its value of the primary metric."""
    rows = []
    for r in results:
        if not r.ran:
            continue
        rows.append([r.method, FLOW_ROLE, "", "", r.parent_run_id])
        for role in r.roles:
            for seed, value in role.values.items():
                rows.append(["", role.role, str(seed), number(value), role.run_ids.get(seed, "—")])
    return rows


# ---------------------------------------------------------------------------------------------------
# the method registry, as `distillery methods` lists it

METHOD_HEADER = ["method", "kind", "data", "seeds", "teacher", "student", "primary metric", "claim"]


def method_rows(params_file: str | os.PathLike = "params.yaml") -> list[list[str]]:
    """Each declared method (tasks/methods) with its params block's data and seeds; the claim's
    statements one a line. A declaration without a params block (or one that does not validate)
    says why in the data column."""
    from ..methods import get_method, list_methods, resolve
    rows = []
    for name in list_methods():
        spec = get_method(name)
        try:
            _, mp, _ = resolve(name, params_file)
            data, seeds = f"{spec.data_stage}: {mp.data}", ", ".join(map(str, mp.seeds))
        except StageError as e:
            data, seeds = f"{spec.data_stage} ({e.problem})", "—"
        rows.append([name, spec.kind, data, seeds, spec.teacher, spec.student or "—",
                     f"{spec.primary_metric} {'↑' if spec.higher_is_better else '↓'}",
                     "\n".join(c.statement for c in spec.claims)])
    return rows
