"""The method's summary: what DVC tracks as `metrics/<method>.json` and MLflow shows on the parent run."""
from __future__ import annotations

from typing import Any

from ..methods import MethodSpec
from ..platform import tracking
from ..platform.common import write_json
from .claims import by_role, summarize


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


def write_report(report: dict[str, Any], path: str) -> str:
    write_json(path, report)
    return path
