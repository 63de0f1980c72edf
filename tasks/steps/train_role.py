"""Training steps: one (role, unit, seed) job as an MLflow run, and trained units composed into the model
a role is evaluated as.

Roles: `teacher` (teacher model, targets alone), `student_labels` (student, targets alone) and
`student_kd` (student, the method's loss against the teacher). The kind says what a unit is, how
its data, model and validation look and how units compose; the loop is `tasks.train.loop.fit`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.distill import DistillationLoss

from ..kinds import Unit, get_kind
from ..methods import MethodSpec, loss_terms
from ..platform import tracking
from ..platform.common import StageError
from ..platform.params import MethodParams, TrainParams
from ..train.checkpoint import Checkpointer
from ..train.loop import fit
from ..train.parallel import SINGLE, Parallel
from . import annotate

log = logging.getLogger(__name__)
CHECKPOINT_DIR = os.environ.get("DISTILLERY_CHECKPOINTS", ".checkpoints")


@dataclass(frozen=True)
class TrainedModel:
    """What later steps need of a trained model: where it is logged and how it did on validation."""
    role: str
    seed: int
    run_id: str
    model_uri: str
    val_score: float
    val_higher_is_better: bool = True  # an accuracy for classifiers, a loss for forecasters
    unit: Unit = None
    # what training measured that a claim may name: the communication hook's `comm_*` counts
    train_metrics: dict[str, float] = field(default_factory=dict)


def resolve_device(name: str = "auto") -> torch.device:
    """`DISTILLERY_DEVICE` (a worker's setting) over the method's `device` param; auto = CUDA if present."""
    name = os.environ.get("DISTILLERY_DEVICE") or name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_name(role: str, unit_name: str, seed: int) -> str:
    return f"{role}-{unit_name}-seed{seed}" if unit_name else f"{role}-seed{seed}"


def checkpoint_path(name: str, job: dict[str, Any]) -> Path:
    """One file per training *and* configuration (not per method: methods share trainings), so a
    resume never continues a different job."""
    key = hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path(CHECKPOINT_DIR) / f"{name}-{key}.pt"


def role_params(mp: MethodParams, role: str) -> dict[str, Any]:
    """The part of a method's params one role's training depends on (and so its cache key): a change
    on the student side leaves the teacher's training, and its cached result, untouched."""
    return {"tp": mp.teacher if role == "teacher" else mp.student, "device": mp.device,
            "loss": mp.loss if role == "student_kd" else {}}


@dataclass(frozen=True)
class UnitJob:
    """One unit's training, everything a process needs to run it. torchrun's ranks get it as JSON in
    a file (`to_json` / `from_json`; never a pickle: a rank must not execute what it reads)."""
    spec: MethodSpec
    role: str
    unit: Unit
    seed: int
    tp: TrainParams
    terms: dict[str, dict[str, Any]]   # the loss
    data_dir: str
    device: str
    ctx: tracking.RunContext
    teacher_uri: str | None
    checkpoint: str
    name: str = ""                     # the run's, for the epoch progress bar

    @property
    def nproc(self) -> int:
        return self.tp.parallel.nproc if self.tp.parallel else 1

    def to_json(self) -> str:
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("spec", "tp", "ctx")}
        return json.dumps({**plain, "method": self.spec.name, "tp": self.tp.model_dump(), "ctx": asdict(self.ctx)})

    @classmethod
    def from_json(cls, text: str) -> "UnitJob":
        """The method's declaration comes from the registry, by name."""
        from ..methods import get_method
        job = json.loads(text)
        return cls(spec=get_method(job.pop("method")), tp=TrainParams(**job.pop("tp")),
                   ctx=tracking.RunContext(**job.pop("ctx")), **job)


def fit_job(job: UnitJob, model: torch.nn.Module, data: Any, device: torch.device, parallel: Parallel = SINGLE,
            on_epoch: Any = None) -> list[dict[str, float]]:
    """`job` through the one loop, on this process's `parallel` share."""
    kind = get_kind(job.spec.kind)
    distilled = job.role == "student_kd"
    teacher = tracking.load_model(job.teacher_uri, job.ctx) if job.teacher_uri else None
    return fit(model, DistillationLoss(job.terms), kind.train_set(data, job.unit), job.tp, seed=job.seed,
               forward=kind.forward, validate=lambda m: kind.validate(m, data, job.unit, device), device=device,
               teacher=teacher, taps=job.spec.feature_taps if distilled else None, cache_batch=kind.cache_batch,
               parallel=parallel, checkpoint=Checkpointer(job.checkpoint, job.tp.checkpoint_every),
               on_epoch=on_epoch, progress=f"{job.spec.name} {job.name}")


def fit_distributed(job: UnitJob, model: torch.nn.Module, run_id: str) -> list[dict[str, float]]:
    """`job` under torchrun (tasks/steps/train_worker.py): rank 0 logs the epochs to `run_id` and
    hands back the weights, loaded into `model`, and the history."""
    from ..train.distributed import launch
    if job.device.startswith("cuda") and torch.cuda.device_count() < job.nproc:
        side = "teacher" if job.role == "teacher" else "student"
        raise StageError("params.yaml", f"methods.{job.spec.name}.{side}.parallel.nproc: {job.nproc} ranks "
                                        f"need {job.nproc} GPUs, this machine has {torch.cuda.device_count()}")
    with tempfile.TemporaryDirectory(prefix="distillery-ddp-") as tmp:
        job_file, result = Path(tmp) / "job.json", Path(tmp) / "result.pt"
        job_file.write_text(job.to_json())
        launch("tasks.steps.train_worker", [str(job_file), run_id, str(result)], job.nproc)
        out = torch.load(result, map_location="cpu", weights_only=True)
    model.load_state_dict(out["model"])
    return out["history"]


def train_unit(spec: MethodSpec, role: str, unit: Unit, seed: int, tp: TrainParams, device: str,
               loss: dict[str, dict[str, Any]], data_dir: str, ctx: tracking.RunContext,
               teacher: TrainedModel | None = None, teacher_version: str | None = None) -> TrainedModel:
    """Trains one unit of one role for one seed with `tp` (see `role_params`) and records it as an
    MLflow run; a distilled student learns from `teacher` with the declared loss and `loss` on top.
    With `tp.parallel.nproc` > 1 the training runs in that many torchrun processes (DDP)."""
    kind = get_kind(spec.kind)
    side = "teacher" if role == "teacher" else "student"
    distilled = role == "student_kd"
    terms = loss_terms(spec, loss) if distilled else kind.labels_loss
    model_name = spec.teacher if side == "teacher" else spec.student
    device = resolve_device(device)
    data = kind.load(data_dir)

    torch.manual_seed(seed)
    model = kind.build(spec, side, data, tp)

    unit_name = kind.unit_name(unit)
    name = run_name(role, unit_name, seed)
    tags = {"method": spec.name, "role": role, "seed": seed, "kind": spec.kind, "model": model_name,
            "device": str(device), "reproduce_tolerance": tracking.REPRODUCE_TOLERANCE}
    if unit_name:
        tags["unit"] = unit_name
    if tp.parallel and tp.parallel.nproc > 1:
        tags.update(nproc=tp.parallel.nproc, comm_hook=tp.parallel.comm_hook)
    if distilled:
        tags.update(teacher_run_id=teacher.run_id, teacher_model_uri=teacher.model_uri,
                    teacher_model_version=teacher_version)
    run_params = {"model": model_name, "seed": seed, "train": tp.model_dump(), "loss": terms,
                  "n_params": sum(p.numel() for p in model.parameters()), "device": str(device)}
    if unit_name:
        run_params["unit"] = unit_name
    ckpt = checkpoint_path(name, {**run_params, "data": ctx.lineage.get("data_sha256"),
                                  "teacher": teacher and teacher.run_id})
    job = UnitJob(spec, role, unit, seed, tp, terms, data_dir, str(device), ctx,
                  teacher.model_uri if distilled else None, str(ckpt), name)
    # the MLflow run's name is the short one a narrow table column shows (`kd s1`); the checkpoint
    # keeps `name`, which stays unique per training
    description = annotate.training_description(
        role, seed, unit_name, model_name, run_params["n_params"], ctx, terms=terms,
        teacher_run_id=teacher.run_id if distilled else None, teacher_version=teacher_version)
    with tracking.run(ctx, annotate.run_name(role, seed, unit_name), tags=tags, params=run_params,
                      description=description) as run_id:
        log.info("%s/%s seed %d on %s%s", spec.name, name, seed, device,  # never a silent CPU fallback
                 f" x {job.nproc} processes" if job.nproc > 1 else "")
        if job.nproc > 1:
            history = fit_distributed(job, model, run_id)
        else:
            epoch_logger = tracking.EpochLogger(run_id, ctx)
            history = fit_job(job, model, data, device, on_epoch=epoch_logger)
            epoch_logger.close()
        tracking.log_learning_curve(history, " · ".join(filter(None, (spec.name, role, unit_name, f"seed {seed}"))))
        model_uri = tracking.log_model(model, kind.input_example(data))
    Checkpointer(ckpt).clear()
    final = history[-1]
    return TrainedModel(role=role, seed=seed, run_id=run_id, model_uri=model_uri, unit=unit,
                        val_score=final[kind.val_key], val_higher_is_better=kind.val_higher_is_better,
                        train_metrics={k: v for k, v in final.items() if k.startswith("comm_")})


def compose(spec: MethodSpec, role: str, seed: int, members: dict[Unit, TrainedModel],
            ctx: tracking.RunContext) -> TrainedModel:
    """The model `role` is evaluated as: the single trained unit itself, or (a forecast) the units
    loaded back from MLflow and logged as one model in a run that names its members."""
    kind = get_kind(spec.kind)
    if not kind.composes:
        (only,) = members.values()
        return only
    model = kind.compose({unit: tracking.load_model(tm.model_uri, ctx) for unit, tm in members.items()})
    names = {unit: kind.unit_name(unit) for unit in members}
    units = ",".join(names[u] for u in sorted(members))
    tags = {"method": spec.name, "role": role, "seed": seed, "kind": spec.kind, "units": units,
            "reproduce_tolerance": tracking.REPRODUCE_TOLERANCE,
            **{f"member_{names[u]}_run_id": tm.run_id for u, tm in members.items()}}
    first = next(iter(members.values()))
    # a derived role (e.g. iterated_1h) composes the teacher's units: the members' role says the model
    model_name = spec.teacher if first.role == "teacher" else spec.student
    description = annotate.training_description(role, seed, units, model_name, 0, ctx, composed=True)
    with tracking.run(ctx, annotate.run_name(role, seed, composed=True), tags=tags,
                      description=description) as run_id:
        uri = tracking.log_model(model, None)
    return TrainedModel(role=role, seed=seed, run_id=run_id, model_uri=uri,
                        val_score=float(np.mean([tm.val_score for tm in members.values()])),
                        val_higher_is_better=first.val_higher_is_better)
