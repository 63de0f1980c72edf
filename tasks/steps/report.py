"""The method's report: the full record, and beside it what `dvc metrics show` and `dvc plots show` read.

    metrics/<method>.json                               the full report: every score, the claim's parts,
                                                        MLflow run ids (also the parent run's report.json)
    metrics/summary/<method>.json                       a few columns: the primary metric per role, the claim
    metrics/plots/learning/<method>/<quantity>[.<unit>].json   per epoch, the mean over seeds of each trained
                                                        role's train_loss and val_* (from MLflow's histories)
    metrics/plots/scores/<method>/<chart>.json          the kind's test scores as bars: per lead time, per
                                                        tIoU threshold, per class (`Kind.score_chart`)

(`metrics/` stands for the directory of the report's path.) dvc.yaml declares the four as the train
stage's `cache: false` outputs, and names `metrics/summary` and the two plot directories in its
top-level `metrics:` and `plots:`. Why: DVC 3 reads every declared metric or plot *file* and warns
"DVC failed to load some metrics" when one is missing, i.e. for every method not run yet; a top-level
*directory* entry lists the files that are there, and `cache: false` outputs are not in DVC's data
index, so a method that has not run is simply absent. One dvc.yaml entry describes every file of a
directory, so those files share their fields: the summary's keys, the learning curves' role columns
(null where a method lacks the role) and the bars' `bar` and `value`.
"""
from __future__ import annotations

import math
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..kinds import get_kind
from ..methods import MethodSpec
from ..platform import tracking
from ..platform.common import atomic_dir, write_json
from .claims import by_role, summarize

# the roles the recipes train (tasks/steps/plan.py): the learning curves' columns, as dvc.yaml's
# `metrics/plots/learning` entry lists them (tests/test_dvc_metrics.py checks both)
LEARNING_ROLES = ("teacher", "student_labels", "student_kd")
# a composed model's run names its trained units' runs in tags `member_<unit>_run_id` (train_role.compose)
MEMBER_TAG = (f"{tracking.TAG}member_", "_run_id")

Rows = list[dict[str, Any]]
# a kind's `score_chart`: a test score's name -> (chart, x), or None for a score on no chart
ChartOf = Callable[[str], "tuple[str, float | str] | None"]


def build_report(spec: MethodSpec, evaluations: list[dict[str, Any]], verdict: dict[str, Any],
                 registry: dict[str, Any], ctx: tracking.RunContext, extra: dict[str, Any]) -> dict[str, Any]:
    scores = by_role(evaluations)
    return {
        "method": spec.name,
        "primary_metric": spec.primary_metric,
        "higher_is_better": spec.higher_is_better,
        # each role's primary metric over seeds (mean, std, min, max, per-seed values)
        "roles": {role: summarize(list(metrics[spec.primary_metric].values())) for role, metrics in scores.items()},
        "claim": verdict,
        # every metric's seed mean per role, e.g. scores["teacher"]["rmse_z500_24h"]
        "scores": {role: {k: sum(v.values()) / len(v) for k, v in metrics.items()} for role, metrics in scores.items()},
        "mlflow": {"tracking_uri": tracking.redact(ctx.tracking_uri), "experiment_id": ctx.experiment_id,
                   "parent_run_id": ctx.parent_run_id, "registry": registry,
                   "runs": {f"{e['role']}/seed{e['seed']}": e["run_id"] for e in evaluations}},
        **extra,
    }


def log_report(report: dict[str, Any], ctx: tracking.RunContext) -> None:
    """On the parent run: the claim's verdict (tags) and each part's mean paired difference and
    interval (metrics `claim.<i>.*`), each role's mean ± std, and the whole report as report.json."""
    run_id, claim = ctx.parent_run_id, report["claim"]
    metrics = {"claim_holds": float(claim["verdict"] == "holds"),
               **{f"claim_parts_{v}": float(n) for v, n in claim["counts"].items()}}
    tags = {"claim": claim["statement"], "claim_verdict": claim["verdict"]}
    for i, part in enumerate(claim["parts"]):
        metrics[f"claim.{i}.diff_mean"] = part["diff_mean"]
        if part["ci95"] is not None:
            metrics[f"claim.{i}.ci95_low"], metrics[f"claim.{i}.ci95_high"] = part["ci95"]
        tags[f"claim.{i}"] = f"{part['statement']}: {part['verdict']}"
    for role, s in report["roles"].items():
        metrics[f"{role}.{report['primary_metric']}_mean"] = s["mean"]
        metrics[f"{role}.{report['primary_metric']}_std"] = s["std"]
    tracking.log_metrics(run_id, metrics, ctx)
    tracking.set_tags(run_id, tags, ctx)
    # the whole report beside the run: a deployment's clone (and its metrics/ file) is temporary
    tracking.log_dict(run_id, report, "report.json", ctx)


# ---------------------------------------------------------------------------------------------------
# the summary: one row of `dvc metrics show`

def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The primary metric (↑: higher is better, ↓: lower), each role's mean of it over seeds, the
    claim's verdict, how many of its parts hold, and the number of seeds. The same keys for every
    method but the roles, so `dvc metrics show` has a handful of columns, not one per score."""
    claim = report["claim"]
    return {"metric": f"{report['primary_metric']} {'↑' if report['higher_is_better'] else '↓'}",
            "claim": claim["verdict"], "held": f"{claim['counts']['holds']}/{len(claim['parts'])}",
            "seeds": max(s["n"] for s in report["roles"].values()),
            **{role: s["mean"] for role, s in report["roles"].items()}}


# ---------------------------------------------------------------------------------------------------
# learning curves, from the training runs' per-epoch metrics in MLflow

@dataclass(frozen=True)
class Training:
    """One trained unit's per-epoch history: {quantity: {epoch: value}} for train_loss and val_*."""
    role: str
    seed: int
    unit: str | None        # a lead-time model's name ("24h"); None where a role trains one model
    history: dict[str, dict[int, float]]


def tracking_uri(report: dict[str, Any]) -> str:
    """The store the report's runs are in. The report holds it without a password; where one was
    cut out, the environment's URI (a worker's) is the one the flow used."""
    uri = report["mlflow"]["tracking_uri"]
    return os.environ.get("MLFLOW_TRACKING_URI", uri) if ":***@" in uri else uri


def trainings(report: dict[str, Any]) -> list[Training]:
    """Every training behind the report's runs, read back from MLflow (the flow keeps no histories).
    A composed model's run names its units' runs in tags; a baseline's run has no epochs; a run
    several roles share (iterated_1h's 1 h unit is the teacher's) is read once, as its own role."""
    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri(report))
    prefix, suffix = MEMBER_TAG
    found: list[Training] = []
    seen: set[str] = set()
    for run_id in report["mlflow"]["runs"].values():
        run = client.get_run(run_id)
        members = [v for k, v in run.data.tags.items() if k.startswith(prefix) and k.endswith(suffix)]
        for rid in sorted(members) or [run_id]:
            if rid in seen:
                continue
            seen.add(rid)
            trained = run if rid == run_id else client.get_run(rid)
            keys = [k for k in trained.data.metrics if k == "train_loss" or k.startswith("val_")]
            if "train_loss" not in keys:
                continue
            # by step (= epoch), the last value logged wins
            history = {k: {m.step: m.value for m in sorted(client.get_metric_history(rid, k),
                                                          key=lambda m: (m.step, m.timestamp))} for k in keys}
            tags = trained.data.tags
            found.append(Training(tags[f"{tracking.TAG}role"], int(tags[f"{tracking.TAG}seed"]),
                                  tags.get(f"{tracking.TAG}unit"), history))
    return found


def learning_curves(trained: list[Training]) -> dict[str, Rows]:
    """Per quantity (and unit): a row per epoch, a column per role, the mean over that role's seeds;
    null where a role did not train or validate that epoch (validation runs every `val_every`)."""
    # (quantity, unit) -> (epoch, role) -> one value per seed
    cells: dict[tuple[str, str | None], dict[tuple[int, str], list[float]]]
    cells = defaultdict(lambda: defaultdict(list))
    for t in trained:
        for quantity, by_epoch in t.history.items():
            for epoch, value in by_epoch.items():
                cells[(quantity, t.unit)][(epoch, t.role)].append(value)
    curves = {}
    for (quantity, unit), values in cells.items():
        roles = [*LEARNING_ROLES, *sorted({r for _, r in values} - set(LEARNING_ROLES))]
        rows = []
        for epoch in sorted({e for e, _ in values}):
            per_seed = {r: values.get((epoch, r)) for r in roles}
            rows.append({"epoch": epoch, **{r: _finite(statistics.fmean(v)) if v else None
                                            for r, v in per_seed.items()}})
        curves[f"{quantity}.{unit}" if unit else quantity] = rows
    return curves


# ---------------------------------------------------------------------------------------------------
# the kind's charts: test scores read as y over x (lead time, tIoU threshold, class), as bars

def score_charts(scores: dict[str, dict[str, float]], chart_of: ChartOf) -> dict[str, Rows]:
    """`chart_of(metric)` places a score on a chart, `(chart, x)`, or leaves it out (None). A chart
    is one bar per x and role, labelled `"<x> · <role>"` so its own text orders the bars (the bars
    are one nominal axis, which DVC's `bar_horizontal` template sorts alphabetically)."""
    cells: dict[str, dict[tuple[float | str, str], float]] = defaultdict(dict)
    for role, metrics in scores.items():
        for metric, value in metrics.items():
            placed = chart_of(metric)
            if placed is not None:
                chart, x = placed
                cells[chart][(x, role)] = value
    charts = {}
    for chart, values in cells.items():
        labels = x_labels({x for x, _ in values})
        charts[chart] = sorted(({"bar": f"{labels[x]} · {role}", "value": _finite(v)}
                                for (x, role), v in values.items()), key=lambda row: row["bar"])
    return charts


def x_labels(xs: set[float | str]) -> dict[float | str, str]:
    """Labels that sort as their values do: non-negative numbers zero-padded to one width of the
    integer part (6, 24 -> "06", "24"; 0.1 stays "0.1"), names (classes) as they are."""
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in xs):
        return {x: str(x) for x in xs}
    text = {x: f"{x:g}" for x in xs}
    width = max(len(t.partition(".")[0]) for t in text.values())
    return {x: "0" * (width - len(t.partition(".")[0])) + t for x, t in text.items()}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN; Vega-Lite skips a null


# ---------------------------------------------------------------------------------------------------
# writing

def report_files(path: str | os.PathLike) -> dict[str, Path]:
    """Where the summary and plot data of the report at `path` go: beside it (metrics/ in DVC's runs)."""
    path = Path(path)
    root, name = path.parent, path.stem
    return {"summary": root / "summary" / f"{name}.json", "learning": root / "plots" / "learning" / name,
            "scores": root / "plots" / "scores" / name}


def write_report(report: dict[str, Any], path: str, trained: list[Training] | None = None) -> str:
    """Writes the report to `path`, and its summary and plot data beside it (`report_files`), each
    atomically. `trained`: the histories of the learning curves (default: read from MLflow). All of
    it is computed before the first file is written: a failure to read MLflow changes no file."""
    files = report_files(path)
    curves = learning_curves(trainings(report) if trained is None else trained)
    chart_of = getattr(get_kind(report["kind"]), "score_chart", None) if "kind" in report else None
    charts = score_charts(report["scores"], chart_of) if chart_of else {}
    # every method writes both plot directories, empty or not: a top-level plots entry whose directory
    # does not exist is an error to DVC, and the train stage declares both as its outputs
    for name, rows in (("learning", curves), ("scores", charts)):
        with atomic_dir(files[name]) as tmp:
            for stem, data in rows.items():
                write_json(tmp / f"{stem}.json", data)
    write_json(files["summary"], summary(report))
    write_json(path, report)
    return path
