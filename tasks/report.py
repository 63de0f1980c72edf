"""The method's summary: what DVC tracks as `metrics/<method>.json` and MLflow shows on the parent run."""
from __future__ import annotations

from typing import Any

from models.registry import MethodSpec

from . import tracking
from .common import write_json
from .evaluate import by_role, summarize


def build_report(spec: MethodSpec, evaluations: list[dict[str, Any]], verdict: dict[str, Any],
                 registry: dict[str, Any], ctx: tracking.RunContext, extra: dict[str, Any]) -> dict[str, Any]:
    scores = by_role(evaluations)
    return {
        "method": spec.name,
        "primary_metric": spec.primary_metric,
        "higher_is_better": spec.higher_is_better,
        # each role's primary metric over seeds (mean, std, min, max, per-seed values)
        "roles": {role: summarize(metrics[spec.primary_metric]) for role, metrics in scores.items()},
        "claim": verdict,
        # every metric's seed mean per role, e.g. scores["teacher"]["rmse_z500_24h"]
        "scores": {role: {k: sum(v) / len(v) for k, v in metrics.items()} for role, metrics in scores.items()},
        "mlflow": {"tracking_uri": tracking.redact(ctx.tracking_uri), "experiment_id": ctx.experiment_id,
                   "parent_run_id": ctx.parent_run_id, "registry": registry,
                   "runs": {f"{e['role']}/seed{e['seed']}": e["run_id"] for e in evaluations}},
        **extra,
    }


def log_report(report: dict[str, Any], ctx: tracking.RunContext) -> None:
    """Claim verdict as a tag and a metric, and each role's mean ± std, on the parent run."""
    run_id = ctx.parent_run_id
    metrics = {"claim_passed": float(report["claim"]["passed"])}
    if "parts" not in report["claim"]:
        metrics["claim_difference"] = report["claim"]["difference"]
    else:
        metrics["claim_failed_parts"] = report["claim"]["failed_parts"]
    for role, s in report["roles"].items():
        metrics[f"{role}.{report['primary_metric']}_mean"] = s["mean"]
        metrics[f"{role}.{report['primary_metric']}_std"] = s["std"]
    tracking.log_metrics(run_id, metrics, ctx)
    tracking.set_tags(run_id, {"claim": report["claim"]["statement"],
                               "claim_passed": str(report["claim"]["passed"]).lower()}, ctx)
    # the whole report beside the run: a deployment's clone (and its metrics/ file) is temporary
    tracking.log_dict(run_id, report, "report.json", ctx)


def write_report(report: dict[str, Any], path: str) -> str:
    write_json(path, report)
    return path
