"""Thin Prefect `@task` wrappers over the plain functions of this package.

Retries only where I/O can fail transiently (reading inputs, talking to the tracking server).
Training steps are cached across flow runs, keyed on their inputs *plus* the content hash of the
data, the hash of the code in `models/` and `tasks/` (Prefect's TASK_SOURCE sees only this file) and
the identity of the MLflow store (a cached result names runs that must still exist).
"""
from __future__ import annotations

import functools
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy

from models.registry import MethodSpec

from . import distill, evaluate, register, report, tracking
from .common import REPO_ROOT, StageError, hash_path
from .train import TrainedModel, train_model, load_data

def _transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry I/O failures, but not bad input: a StageError will fail the same way again."""
    try:
        state.result()
    except StageError:
        return False
    except Exception:
        return True
    return True


IO_RETRIES = dict(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_transient)


@functools.cache
def code_hash() -> str:
    return hash_path(REPO_ROOT / "models")[:16] + hash_path(REPO_ROOT / "tasks")[:16]


def _store_and_code(context: Any, parameters: dict[str, Any]) -> str:
    return f"{parameters['ctx'].store_id}|{code_hash()}"


TRAINING_CACHE = (INPUTS - "ctx") + TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_store_and_code)


@task(name="pull-data", **IO_RETRIES)
def pull_data(data_dir: str) -> str:
    """`dvc pull` of the method's inputs on a worker (tasks.platform.dvc_remote)."""
    from .platform.dvc_remote import pull
    return pull(data_dir)


@task(name="validate-inputs", **IO_RETRIES)
def validate_inputs(spec: MethodSpec, data_dir: str) -> str:
    """Runs the data stage's Great Expectations suites on the method's inputs; returns their hash."""
    load_data(spec, data_dir, validate=True)
    return hash_path(data_dir)


@task(name="open-experiment", **IO_RETRIES)
def open_experiment(name: str, params: dict[str, Any], lineage: dict[str, str]) -> tracking.RunContext:
    return tracking.experiment_context(name, params, lineage)


@task(name="train-teacher", cache_policy=TRAINING_CACHE)
def train_teacher(spec: MethodSpec, data_dir: str, data_hash: str, params: dict[str, Any], seed: int,
                  ctx: tracking.RunContext) -> TrainedModel:
    return train_model(spec, "teacher", data_dir, params, seed, ctx)


@task(name="register-teacher", **IO_RETRIES)
def register_teacher(spec: MethodSpec, teacher: TrainedModel, ctx: tracking.RunContext) -> int:
    return register.register_teacher(spec, teacher, ctx)


@task(name="distill-student", cache_policy=TRAINING_CACHE)
def distill_student(spec: MethodSpec, teacher: TrainedModel, teacher_version: str, data_dir: str,
                    data_hash: str, params: dict[str, Any], seed: int, ctx: tracking.RunContext) -> TrainedModel:
    return distill.distill_student(spec, teacher, teacher_version, data_dir, params, seed, ctx)


@task(name="train-baseline", cache_policy=TRAINING_CACHE)
def train_baseline(spec: MethodSpec, role: str, data_dir: str, data_hash: str, params: dict[str, Any],
                   seed: int, ctx: tracking.RunContext) -> TrainedModel:
    if role != "student_labels":
        raise ValueError(f"method {spec.name}: no trainer for baseline {role!r}")
    return train_model(spec, role, data_dir, params, seed, ctx)


@task(name="evaluate")
def evaluate_models(spec: MethodSpec, data_dir: str, trained: list[TrainedModel],
                    ctx: tracking.RunContext) -> list[dict[str, Any]]:
    return evaluate.evaluate_models(spec, data_dir, trained, ctx)


@task(name="check-claim")
def check_claim(spec: MethodSpec, evaluations: list[dict[str, Any]]) -> dict[str, Any]:
    return evaluate.check_claims(spec.claims, evaluate.by_role(evaluations))


@task(name="register-models", **IO_RETRIES)
def register_models(spec: MethodSpec, teacher: TrainedModel, teacher_version: int,
                    students: list[TrainedModel], evaluations: list[dict[str, Any]],
                    verdict: dict[str, Any], ctx: tracking.RunContext) -> dict[str, Any]:
    return register.register_models(spec, teacher, teacher_version, students, evaluations, verdict, ctx)


@task(name="write-report", **IO_RETRIES)
def write_report(spec: MethodSpec, evaluations: list[dict[str, Any]], verdict: dict[str, Any],
                 registry: dict[str, Any], ctx: tracking.RunContext, extra: dict[str, Any],
                 path: str | None) -> dict[str, Any]:
    rep = report.build_report(spec, evaluations, verdict, registry, ctx, extra)
    report.log_report(rep, ctx)
    if path:
        report.write_report(rep, path)
    return rep


# ---------------------------------------------------------------------------------------------------
# forecast methods (ERA5)

@task(name="validate-forecast-inputs", **IO_RETRIES)
def validate_forecast_inputs(data_dir: str) -> str:
    """Runs the ERA5 suites on the prepared splits; returns their hash."""
    from .forecast import load_forecast_data
    load_forecast_data(data_dir, validate=True)
    return hash_path(data_dir)


@task(name="train-lead-model", cache_policy=TRAINING_CACHE)
def train_lead_model(spec: MethodSpec, role: str, lead: int, data_dir: str, data_hash: str,
                     params: dict[str, Any], seed: int, ctx: tracking.RunContext,
                     teacher: TrainedModel | None = None, teacher_version: str | None = None) -> TrainedModel:
    from . import forecast
    if role == "student_kd":
        params = dict(params, loss_terms=distill.loss_terms(spec, params.get("loss")))
    tags = {"teacher_model_version": teacher_version} if teacher_version else None
    return forecast.train_lead_model(spec, role, lead, data_dir, params, seed, ctx, teacher=teacher, extra_tags=tags)


@task(name="compose-forecaster", **IO_RETRIES)
def compose_forecaster(spec: MethodSpec, role: str, members: dict[int, TrainedModel], seed: int,
                       ctx: tracking.RunContext) -> TrainedModel:
    from . import forecast
    return forecast.compose_forecaster(spec, role, members, seed, ctx)


@task(name="evaluate-forecasts")
def evaluate_forecasters(spec: MethodSpec, data_dir: str, forecasters: list[TrainedModel], leads: list[int],
                         ctx: tracking.RunContext) -> list[dict[str, Any]]:
    from . import forecast
    return forecast.evaluate_forecasters(spec, data_dir, forecasters, leads, ctx)


@task(name="forecast-plots", **IO_RETRIES)
def log_forecast_plots(evaluations: list[dict[str, Any]], data_dir: str, teacher: TrainedModel,
                       leads: list[int], ctx: tracking.RunContext) -> None:
    from . import forecast
    forecast.log_forecast_plots(evaluations, data_dir, teacher, leads, ctx)
