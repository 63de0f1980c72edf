"""Model registry step: versions for a method's teacher and best distilled student; `champion` moves
to a version only when it beats the current champion on the method's primary metric."""
from __future__ import annotations

from typing import Any

from ..methods import MethodSpec
from ..platform import tracking
from .train_role import TrainedModel


def registered_names(spec: MethodSpec) -> dict[str, str]:
    """The method's product is its student, with the teacher registered beside it; a method without
    a student (e.g. a forecaster checked against baselines) registers its teacher under its name."""
    if spec.student is None:
        return {"teacher": spec.name}
    return {"student_kd": spec.name, "teacher": f"{spec.name}_teacher"}


def register_teacher(spec: MethodSpec, teacher: TrainedModel, ctx: tracking.RunContext) -> int:
    """Registered straight after training, so every student can name the version it learned from."""
    name = registered_names(spec)["teacher"]
    return tracking.register_version(name, teacher.model_uri, teacher.run_id, ctx,
                                     tags={"role": "teacher", "seed": teacher.seed})


def register_models(spec: MethodSpec, teacher: TrainedModel, teacher_version: int,
                    students: list[TrainedModel], evaluations: list[dict[str, Any]],
                    verdict: dict[str, Any], ctx: tracking.RunContext) -> dict[str, Any]:
    """Registers the distilled student with the best *validation* score (the test split only reports)
    and offers both models the champion alias on their test primary metric."""
    test_score = {(e["role"], e["seed"]): e["metrics"][spec.primary_metric] for e in evaluations}
    names = registered_names(spec)
    teacher_result = tracking.promote_if_better(names["teacher"], teacher_version,
                                                test_score[("teacher", teacher.seed)], spec.higher_is_better, ctx)
    if not students:
        return {"teacher": teacher_result}
    pick = max if students[0].val_higher_is_better else min
    best = pick(students, key=lambda s: s.val_score)
    student_version = tracking.register_version(
        names["student_kd"], best.model_uri, best.run_id, ctx,
        tags={"role": "student_kd", "seed": best.seed, "claim_verdict": verdict["verdict"],
              "teacher_run_id": teacher.run_id, "teacher_model": f"{names['teacher']}/{teacher_version}"})
    return {"teacher": teacher_result,
            "student_kd": tracking.promote_if_better(names["student_kd"], student_version,
                                                     test_score[("student_kd", best.seed)], spec.higher_is_better, ctx)}
