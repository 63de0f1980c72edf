"""Distillation step: the method's student trained against its teacher with the method's loss terms."""
from __future__ import annotations

from typing import Any

from models.registry import MethodSpec

from .tracking import RunContext
from .train import TrainedModel, train_model


def loss_terms(spec: MethodSpec, overrides: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """The method's loss terms from the registry, with params.yaml's values on top."""
    terms = {name: dict(cfg) for name, cfg in spec.loss.items()}
    for name, cfg in (overrides or {}).items():
        if name not in terms:
            raise KeyError(f"params.yaml: loss term {name!r} is not one of method {spec.name}'s "
                           f"terms {sorted(terms)}")
        terms[name].update(cfg)
    return terms


def distill_student(spec: MethodSpec, teacher: TrainedModel, teacher_version: str, data_dir: str,
                    params: dict[str, Any], seed: int, ctx: RunContext) -> TrainedModel:
    """Trains the student from `teacher`, loaded from its logged MLflow model; the run's lineage tags
    name the teacher's run, model URI and registered version (`name/version`)."""
    params = dict(params, loss_terms=loss_terms(spec, params.get("loss")))
    return train_model(spec, "student_kd", data_dir, params, seed, ctx, teacher=teacher,
                       extra_tags={"teacher_model_version": teacher_version})
