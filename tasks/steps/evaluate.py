"""Scoring: every evaluated model, loaded back from MLflow (so what is scored is what was logged), and
every non-learned baseline of the kind, on the held-out test split."""
from __future__ import annotations

from typing import Any

from ..kinds import get_kind
from ..methods import MethodSpec
from ..platform import tracking
from ..platform.params import MethodParams
from .annotate import SCORE, baseline_description
from .train_role import TrainedModel


def evaluate(spec: MethodSpec, mp: MethodParams, data_dir: str, trained: list[TrainedModel],
             ctx: tracking.RunContext) -> list[dict[str, Any]]:
    """One evaluation per model and baseline: {role, seed, run_id, metrics}; each model's run gets
    `test_<metric>`, and each baseline a run of its own that holds its metrics. Every one of those
    runs also gets `score`, its test primary metric under the one name every method shares, so the
    MLflow runs table and compare page line up teacher, students and baselines in one column."""
    kind = get_kind(spec.kind)
    data = kind.load(data_dir)
    evaluations = []
    score_tags = {"score_metric": f"test_{spec.primary_metric}",
                  "score_higher_is_better": str(spec.higher_is_better).lower()}

    def record(role: str, seed: int, run_id: str, predict: Any, model_uri: str | None = None,
               measured: dict[str, float] | None = None) -> None:
        metrics = kind.test_metrics(predict, data, mp)
        tracking.log_metrics(run_id, {**{f"test_{k}": v for k, v in metrics.items()},
                                      SCORE: metrics[spec.primary_metric]}, ctx)
        tracking.annotate_run(run_id, ctx, tags=score_tags)
        # what training measured (bytes a communication hook sent) sits beside the test metrics
        evaluations.append({"role": role, "seed": seed, "run_id": run_id, "metrics": {**(measured or {}), **metrics},
                            "model_uri": model_uri})

    for tm in sorted(trained, key=lambda t: (t.role, t.seed)):
        record(tm.role, tm.seed, tm.run_id, kind.predictor(tracking.load_model(tm.model_uri, ctx), data),
               tm.model_uri, tm.train_metrics)
    for role, predict in kind.baselines(spec, data).items():
        tags = {"method": spec.name, "role": role, "seed": 0, "kind": spec.kind,
                "reproduce_tolerance": tracking.REPRODUCE_TOLERANCE}
        with tracking.run(ctx, role, tags=tags, description=baseline_description(role, spec.kind, ctx)) as run_id:
            pass
        record(role, 0, run_id, predict)
    return evaluations


def log_report_figures(spec: MethodSpec, mp: MethodParams, data_dir: str, evaluations: list[dict[str, Any]],
                       teacher: TrainedModel, ctx: tracking.RunContext) -> list[str]:
    """The kind's figures of the whole method (e.g. RMSE against lead time, forecast maps) on the
    parent run, drawn from the registered teacher and, when the method's product is another model,
    the product of its first seed; returns their artifact names."""
    kind = get_kind(spec.kind)
    figures_of = getattr(kind, "report_figures", None)
    if figures_of is None:
        return []
    import matplotlib.pyplot as plt
    data = kind.load(data_dir)
    products = sorted((e["seed"], e["model_uri"]) for e in evaluations
                      if e["role"] == spec.product_role != "teacher" and e.get("model_uri"))
    product = tracking.load_model(products[0][1], ctx) if products else None
    figures = figures_of(evaluations, data, tracking.load_model(teacher.model_uri, ctx), mp, product)
    for name, fig in figures.items():
        tracking.log_figure(ctx.parent_run_id, fig, name, ctx)
        plt.close(fig)
    return list(figures)
