"""Model registry step: versions for a method's teacher and its best product model; `champion` moves
to a version only when it beats the current champion on the method's primary metric."""
from __future__ import annotations

from typing import Any

from ..methods import MethodSpec
from ..platform import tracking
from .plan import registered_names
from .annotate import data_line, role_label, run_ref, summary
from .train_role import TrainedModel


def register_teacher(spec: MethodSpec, teacher: TrainedModel, ctx: tracking.RunContext) -> int:
    """Registered straight after training, so every student can name the version it learned from."""
    name = registered_names(spec)["teacher"]
    version = tracking.register_version(name, teacher.model_uri, teacher.run_id, ctx,
                                        tags={"role": "teacher", "seed": teacher.seed})
    describe(spec, name, version, teacher, ctx, f"the best teacher on validation ({teacher.val_score:.4g})")
    return version


def describe(spec: MethodSpec, name: str, version: int, model: TrainedModel, ctx: tracking.RunContext,
             why: str, more: str = "") -> None:
    """The version's and the registered model's Markdown descriptions: what the model is, the run it
    comes from and why this one was registered."""
    side = spec.teacher if model.role == "teacher" or spec.student is None else spec.student
    experiment = f"[{spec.name}]({tracking.experiment_link(ctx.experiment_id)})"
    tracking.describe_model(
        name, version, ctx,
        f"`{side}` ({model.role}, seed {model.seed}) of {experiment}: {why}. From the run "
        f"{run_ref(model.run_id, ctx)}, on {data_line(ctx.lineage)}.{more}",
        f"The {role_label(model.role)} model of {experiment}: {summary(spec)} `{tracking.CHAMPION}` is the "
        f"version with the best test {spec.primary_metric}; a tie keeps the older one.")


def register_models(spec: MethodSpec, teacher: TrainedModel, teacher_version: int,
                    students: list[TrainedModel], evaluations: list[dict[str, Any]],
                    verdict: dict[str, Any], ctx: tracking.RunContext) -> dict[str, Any]:
    """Registers the product-role student with the best *validation* score (the test split only
    reports) and offers both models the champion alias on their test primary metric."""
    test_score = {(e["role"], e["seed"]): e["metrics"][spec.primary_metric] for e in evaluations}
    names = registered_names(spec)
    teacher_result = tracking.promote_if_better(names["teacher"], teacher_version,
                                                test_score[("teacher", teacher.seed)], spec.higher_is_better, ctx)
    role = spec.product_role
    students = [s for s in students if s.role == role]
    if not students:
        return {"teacher": teacher_result}
    pick = max if students[0].val_higher_is_better else min
    best = pick(students, key=lambda s: s.val_score)
    tags = {"role": role, "seed": best.seed, "claim_verdict": verdict["verdict"]}
    if role == "student_kd":  # lineage: the teacher it learned from
        tags.update(teacher_run_id=teacher.run_id, teacher_model=f"{names['teacher']}/{teacher_version}")
    version = tracking.register_version(names[role], best.model_uri, best.run_id, ctx, tags=tags)
    lineage = ""
    if role == "student_kd":
        teacher_name = names["teacher"]
        lineage = (f" Distilled from [{teacher_name} v{teacher_version}]"
                   f"({tracking.model_version_link(teacher_name, teacher_version)}).")
    describe(spec, names[role], version, best, ctx,
             f"the best of {len(students)} seeds on validation ({best.val_score:.4g}); test {spec.primary_metric} "
             f"{test_score[(role, best.seed)]:.4g}; claim `{verdict['statement']}` {verdict['verdict']} when "
             f"registered", lineage)
    return {"teacher": teacher_result,
            role: tracking.promote_if_better(names[role], version, test_score[(role, best.seed)],
                                             spec.higher_is_better, ctx)}
