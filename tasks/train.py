"""Training: one loop for teachers, label-only students and distilled students.

`fit` is plain PyTorch (no tracking); `train_model` builds a role's model through the registry, fits it,
and records the run in MLflow (params, per-epoch metrics, learning curve, model, lineage).
"""
from __future__ import annotations

import importlib
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from models import create_model
from models.distill import DistillationLoss, ForwardHookManager, forward_with_taps
from models.registry import MethodSpec

from . import tracking
from .evaluate import classification_metrics

log = logging.getLogger(__name__)
LABELS_ONLY = {"ce": {"weight": 1.0}}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    # "bf16": training forward passes (model and loss) under torch.autocast in bfloat16, as the full
    # profile on GPU workers trains; weights, gradients and the optimizer state stay float32
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")

    @classmethod
    def from_params(cls, p: dict[str, Any]) -> "TrainConfig":
        return cls(epochs=int(p["epochs"]), batch_size=int(p["batch_size"]), lr=float(p["lr"]),
                   weight_decay=float(p.get("weight_decay", 0.0)), precision=str(p.get("precision", "fp32")))

    def autocast(self, device: torch.device) -> torch.autocast:
        dtype = PRECISIONS[self.precision]
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@dataclass(frozen=True)
class TrainedModel:
    """What later tasks need of a trained model: where it is logged and how it did on validation."""
    role: str
    seed: int
    run_id: str
    model_uri: str
    val_score: float
    val_higher_is_better: bool = True  # an accuracy for classifiers, a loss for forecasters


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_data(spec: MethodSpec, data_dir: str, validate: bool = False):
    """The method's splits, read by its data stage's module (`tasks.<data_stage>.load_splits`)."""
    return importlib.import_module(f"tasks.{spec.data_stage}").load_splits(data_dir, validate=validate)


def fit(model: nn.Module, train, val, cfg: TrainConfig, *, seed: int, criterion: DistillationLoss,
        teacher: nn.Module | None = None, taps: dict[str, tuple[str, ...]] | None = None,
        device: torch.device = torch.device("cpu"),
        on_epoch: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """Trains a classifier (labels, or a distillation loss against `teacher`); one row per epoch.

    A frozen teacher's outputs (logits and tapped features) are computed once for the whole training
    set in eval mode and indexed per batch: the teacher never changes, so recomputing them is waste.
    """
    taps = taps or {}
    model.to(device)
    x, y = train.x.to(device), train.y.to(device)
    teacher_out = None
    if criterion.needs_teacher:
        teacher_out = frozen_teacher_outputs(teacher, taps.get("teacher", ()), device, len(x),
                                             lambda sl, hooks: forward_with_taps(teacher, x[sl], hooks),
                                             chunk=len(x))
    s_hooks = ForwardHookManager.on(model, taps.get("student", ()))

    def batch(idx: torch.Tensor):
        return forward_with_taps(model, x[idx], s_hooks), _index(teacher_out, idx), y[idx]

    def validate() -> dict[str, float]:
        return {f"val_{k}": v for k, v in classification_metrics(model, val.x, val.y).items()}

    try:
        return run_epochs(model, criterion, len(x), batch, validate, cfg, seed=seed, device=device,
                          on_epoch=on_epoch, hooks=s_hooks)
    finally:
        s_hooks.clear()


def frozen_teacher_outputs(teacher: nn.Module | None, tap_paths: tuple[str, ...], device: torch.device, n: int,
                           forward: Callable[[slice, ForwardHookManager], dict[str, torch.Tensor]],
                           chunk: int = 64) -> dict[str, torch.Tensor]:
    """A frozen teacher's outputs (and tapped features) for all `n` training inputs, computed once in
    eval mode, `chunk` inputs at a time: the teacher never changes, so recomputing them per batch is
    waste. `forward(slice, hooks)` runs the teacher on those inputs."""
    if teacher is None:
        raise ValueError("this loss needs a teacher")
    teacher.to(device).eval()
    hooks = ForwardHookManager.on(teacher, tap_paths)
    with torch.no_grad():
        chunks = [forward(slice(i, i + chunk), hooks) for i in range(0, n, chunk)]
    hooks.clear()
    return {key: torch.cat([c[key] for c in chunks]) for key in chunks[0]}


def run_epochs(model: nn.Module, criterion: DistillationLoss, n: int, batch: Callable[[torch.Tensor], tuple],
               validate: Callable[[], dict[str, float]], cfg: TrainConfig, *, seed: int, device: torch.device,
               on_epoch: Callable[[dict[str, float]], None] | None = None,
               hooks: ForwardHookManager | None = None) -> list[dict[str, float]]:
    """The loop every trainer shares: AdamW with a cosine schedule over `n` samples in seeded random
    order; `batch(idx)` returns the criterion's (student, teacher, targets) for those samples."""
    criterion.to(device)
    # one forward pass before building the optimizer: losses with learned adapters create them lazily
    with torch.no_grad():
        criterion(*batch(torch.arange(min(2, n), device=device)))
    opt = torch.optim.AdamW(list(model.parameters()) + list(criterion.parameters()), lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * -(-n // cfg.batch_size))
    gen = torch.Generator().manual_seed(seed)

    history = []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0, loss_sum, parts_sum = time.perf_counter(), 0.0, {}
        for idx in torch.randperm(n, generator=gen).split(cfg.batch_size):
            with cfg.autocast(device):
                loss, parts = criterion(*batch(idx.to(device)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v * len(idx)
        if hooks is not None:
            hooks.pop_io_dict()  # the validation pass must not see (or grow) the tapped outputs
        row = {"epoch": epoch, "train_loss": loss_sum / n, "epoch_seconds": time.perf_counter() - t0,
               **{f"train_loss_{k}": v / n for k, v in parts_sum.items()}, **validate()}
        history.append(row)
        if on_epoch:
            on_epoch(row)
    return history


def _index(outputs: dict[str, torch.Tensor] | None, idx) -> dict[str, torch.Tensor] | None:
    return None if outputs is None else {k: v[idx] for k, v in outputs.items()}


def train_model(spec: MethodSpec, role: str, data_dir: str, params: dict[str, Any], seed: int,
                ctx: tracking.RunContext, teacher: TrainedModel | None = None,
                extra_tags: dict[str, Any] | None = None) -> TrainedModel:
    """Trains one role of a method for one seed and records it as an MLflow run.

    Roles: `teacher` (teacher model, labels), `student_labels` (student, labels only) and
    `student_kd` (student, the method's loss against `teacher`; see `tasks.distill`).
    """
    distilled = role == "student_kd"
    model_name = spec.teacher if role == "teacher" else spec.student
    terms = params["loss_terms"] if distilled else LABELS_ONLY
    cfg = TrainConfig.from_params(params["teacher" if role == "teacher" else "student"])
    device = resolve_device(params.get("device", "auto"))
    data = load_data(spec, data_dir)

    torch.manual_seed(seed)
    model = create_model(model_name)
    criterion = DistillationLoss(terms)
    teacher_model = tracking.load_model(teacher.model_uri, ctx) if distilled else None

    tags = {"method": spec.name, "role": role, "seed": seed, "model": model_name, "device": str(device)}
    if distilled:
        tags.update(teacher_run_id=teacher.run_id, teacher_model_uri=teacher.model_uri)
    tags.update(extra_tags or {})
    run_params = {"model": model_name, "seed": seed, "train": asdict(cfg), "loss": terms,
                  "n_params": sum(p.numel() for p in model.parameters()), "device": str(device)}
    with tracking.run(ctx, f"{role}-seed{seed}", tags=tags, params=run_params) as run_id:
        log.info("%s/%s seed %d on %s", spec.name, role, seed, device)  # never a silent CPU fallback
        epoch_logger = tracking.EpochLogger(run_id, ctx)
        history = fit(model, data["train"], data["val"], cfg, seed=seed, criterion=criterion,
                      teacher=teacher_model, taps=spec.feature_taps if distilled else None, device=device,
                      on_epoch=epoch_logger)
        epoch_logger.close()
        tracking.log_learning_curve(history, f"{spec.name} · {role} · seed {seed}")
        model_uri = tracking.log_model(model, data["train"].x[:4])
    return TrainedModel(role=role, seed=seed, run_id=run_id, model_uri=model_uri,
                        val_score=history[-1][f"val_{spec.primary_metric}"])
