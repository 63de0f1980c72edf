"""The flow's steps as Prefect tasks: thin wrappers over the plain functions of `tasks/` (the only
place, with the flow itself, that imports Prefect).

Retries only where I/O can fail transiently (data, the tracking server), never on a StageError,
which would fail the same way again. Training is cached across flow runs, and across methods, on
what decides it: the role's own params, its model (and for a distilled student the loss, taps and
teacher), the unit and seed, the data's content hash, the hash of the code training runs (the
method's DVC deps but its declaration file: `tasks.platform.lineage.training_code_paths`) and the
identity of the MLflow store (a cached result names runs that must still exist).
"""
from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CacheKeyFnPolicy
from prefect.utilities.hashing import hash_objects

from tasks.kinds import Unit, get_kind
from tasks.methods import MethodSpec
from tasks.platform import tracking, validation
from tasks.platform.common import StageError, hash_path
from tasks.platform.params import MethodParams, TrainParams
from tasks.steps import annotate, claims, evaluate as scoring, register as registry, report as reporting, train_role
from tasks.steps.train_role import TrainedModel


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


def _training_identity(context: Any, parameters: dict[str, Any]) -> str:
    """What of the method decides a role's training, and the store that holds the result. Not the
    method's name or claim: methods on the same data with the same teacher share its training (pangu,
    pangu_hta and pangu_student's seed-0 teachers; hinton_kd's and fitnet_hint's teacher)."""
    spec, role = parameters["spec"], parameters["role"]
    fields = {"kind": spec.kind, "model": spec.teacher if role == "teacher" else spec.student}
    if role == "student_kd":
        fields.update(loss=spec.loss, taps=spec.feature_taps)
    return f"{parameters['ctx'].store_id}|{hash_objects(fields)}"


TRAINING_CACHE = (INPUTS - "ctx" - "spec") + TASK_SOURCE + CacheKeyFnPolicy(cache_key_fn=_training_identity)


@task(name="pull-data", **IO_RETRIES)
def pull_data(data_dir: str) -> str:
    """`dvc pull` of the method's inputs on a worker (tasks.platform.dvc_remote)."""
    from tasks.platform.dvc_remote import pull
    return pull(data_dir)


@task(name="validate-inputs", **IO_RETRIES)
def validate_inputs(kind: str, data_dir: str) -> str:
    """Runs the data contract's Great Expectations suites on the method's inputs, unless these very
    bytes passed this contract before (tasks.platform.validation); returns their hash."""
    data_hash = hash_path(data_dir)
    if not validation.passed_before(kind, data_hash):
        get_kind(kind).load(data_dir, validate=True)
        validation.remember_pass(kind, data_hash, data_dir)
    return data_hash


@task(name="open-experiment", **IO_RETRIES)
def open_experiment(name: str, params: dict[str, Any], lineage: dict[str, str]) -> tracking.RunContext:
    return tracking.experiment_context(name, params, lineage)


@task(name="describe-experiment", **IO_RETRIES)
def describe_experiment(spec: MethodSpec, mp: MethodParams, ctx: tracking.RunContext,
                        verdict: dict[str, Any] | None = None) -> None:
    """The experiment's description, primary metric and saved comparison view (tasks.steps.annotate)."""
    annotate.annotate_experiment(spec, mp, ctx, verdict)


@task(name="annotate-runs", **IO_RETRIES)
def annotate_runs(spec: MethodSpec, models: list[TrainedModel], evaluations: list[dict[str, Any]],
                  verdict: dict[str, Any], ctx: tracking.RunContext) -> list[str]:
    """The verdict on every run of the flow, their descriptions' results, the parent's name."""
    return annotate.annotate_flow(spec, models, evaluations, verdict, ctx)


@task(name="train", cache_policy=TRAINING_CACHE, task_run_name="train-{role}-{seed}")
def train_unit(spec: MethodSpec, role: str, unit: Unit, seed: int, tp: TrainParams, device: str,
               loss: dict[str, Any], data_dir: str, data_hash: str, code_hash: str, ctx: tracking.RunContext,
               teacher: TrainedModel | None = None, teacher_version: str | None = None) -> TrainedModel:
    return train_role.train_unit(spec, role, unit, seed, tp, device, loss, data_dir, ctx, teacher, teacher_version)


@task(name="compose", **IO_RETRIES)
def compose(spec: MethodSpec, role: str, seed: int, members: dict[Unit, TrainedModel],
            ctx: tracking.RunContext) -> TrainedModel:
    return train_role.compose(spec, role, seed, members, ctx)


@task(name="register-teacher", **IO_RETRIES)
def register_teacher(spec: MethodSpec, teacher: TrainedModel, ctx: tracking.RunContext) -> int:
    return registry.register_teacher(spec, teacher, ctx)


@task(name="evaluate")
def evaluate(spec: MethodSpec, mp: MethodParams, data_dir: str, models: list[TrainedModel],
             ctx: tracking.RunContext) -> list[dict[str, Any]]:
    return scoring.evaluate(spec, mp, data_dir, models, ctx)


@task(name="check-claim")
def check_claim(spec: MethodSpec, evaluations: list[dict[str, Any]]) -> dict[str, Any]:
    return claims.check_claims(spec.claims, claims.by_role(evaluations))


@task(name="register-models", **IO_RETRIES)
def register_models(spec: MethodSpec, teacher: TrainedModel, teacher_version: int, students: list[TrainedModel],
                    evaluations: list[dict[str, Any]], verdict: dict[str, Any],
                    ctx: tracking.RunContext) -> dict[str, Any]:
    return registry.register_models(spec, teacher, teacher_version, students, evaluations, verdict, ctx)


@task(name="report-figures", **IO_RETRIES)
def log_report_figures(spec: MethodSpec, mp: MethodParams, data_dir: str, evaluations: list[dict[str, Any]],
                       teacher: TrainedModel, ctx: tracking.RunContext) -> list[str]:
    return scoring.log_report_figures(spec, mp, data_dir, evaluations, teacher, ctx)


@task(name="write-report", **IO_RETRIES)
def write_report(spec: MethodSpec, evaluations: list[dict[str, Any]], verdict: dict[str, Any],
                 registry_result: dict[str, Any], ctx: tracking.RunContext, extra: dict[str, Any],
                 path: str | None) -> dict[str, Any]:
    rep = reporting.build_report(spec, evaluations, verdict, registry_result, ctx, extra)
    reporting.log_report(rep, ctx)
    if path:
        reporting.write_report(rep, path)
    return rep
