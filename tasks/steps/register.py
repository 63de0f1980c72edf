"""Model registry step: versions for a method's teacher and its best product model; `champion` moves
to a version only when it beats the current champion on the method's primary metric."""
from __future__ import annotations

from typing import Any

from ..methods import MethodSpec
from ..platform import tracking
from .train_role import TrainedModel


def registered_names(spec: MethodSpec) -> dict[str, str]:
    """The method's product (its recipe's product role: a distilled student, or a cheaper model a
    `compare` method checks) is registered under the method's name, with the teacher beside it; a
    method whose product is its teacher (e.g. a forecaster checked against baselines) registers the
    teacher under its name."""
    if spec.product_role == "teacher":
        return {"teacher": spec.name}
    return {spec.product_role: spec.name, "teacher": f"{spec.name}_teacher"}


def register_teacher(spec: MethodSpec, teacher: TrainedModel, ctx: tracking.RunContext) -> int:
    """Registered straight after training, so every student can name the version it learned from."""
    name = registered_names(spec)["teacher"]
    return tracking.register_version(name, teacher.model_uri, teacher.run_id, ctx,
                                     tags={"role": "teacher", "seed": teacher.seed})


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
    return {"teacher": teacher_result,
            role: tracking.promote_if_better(names[role], version, test_score[(role, best.seed)],
                                             spec.higher_is_better, ctx)}
