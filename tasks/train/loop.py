"""The one train loop: every kind, role and unit trains through `fit`.

    history = fit(model, criterion, train_set, cfg, seed=0, forward=kind.forward,
                  validate=lambda m: kind.validate(m, data, unit, device))

A kind supplies the Dataset (a batch is `(inputs, targets, index)`, fetched in one gather by its
`__getitems__`), how a model turns inputs into the outputs the loss reads (`forward`) and the
per-epoch validation. Each epoch draws a seeded random order of the training set; only the current
batch is on the device. A step: forward (bf16 autocast when `precision: bf16`) -> loss -> backward ->
clip -> optimizer -> schedule. A frozen teacher runs on every batch in eval mode, or once over the
training set when `cache_teacher` asks for it (only valid without augmentation). A checkpoint every
`checkpoint_every` steps lets a killed run resume to the same final weights; `parallel` is the seam
where DDP and communication hooks plug in (tasks/train/parallel.py): every rank runs this loop on its
shard of each global batch, and only the main rank validates and writes checkpoints.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import torch
import torch.nn as nn

from models.distill import DistillationLoss, ForwardHookManager

from ..kinds.base import to_device
from ..platform.params import TrainParams
from ..platform.progress import progress_bar
from .checkpoint import Checkpointer
from .parallel import SINGLE, Parallel

Outputs = dict[str, torch.Tensor]


class EpochBatches(torch.utils.data.Sampler):
    """Batches of a new seeded random permutation each epoch, `torch.randperm(n, gen).split(b)`, cut
    to this rank's share (`global_size`: the whole batch's). `restart` replays an epoch from its start
    state, skipping done batches."""

    def __init__(self, n: int, batch_size: int, seed: int, parallel: Parallel = SINGLE) -> None:
        self.n, self.batch_size, self.parallel = n, batch_size, parallel
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_start: torch.Tensor | None = None
        self._skip = 0
        self.global_size = 0

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        self.epoch_start = self.generator.get_state()
        batches = torch.randperm(self.n, generator=self.generator).split(self.batch_size)
        skip, self._skip = self._skip, 0
        for batch in batches[skip:]:
            self.global_size = len(batch)  # read by the loop while this batch is current (no workers)
            yield self.parallel.shard(batch)

    def restart(self, epoch_start: torch.Tensor, done: int) -> None:
        self.generator.set_state(epoch_start)
        self._skip = done


def build_optimizer(cfg: TrainParams, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: TrainParams, opt: torch.optim.Optimizer, total_steps: int):
    """Cosine decay to zero over the run (or constant), after `warmup_steps` of linear warm-up."""
    sched = torch.optim.lr_scheduler
    after = max(1, total_steps - cfg.warmup_steps)
    main = (sched.CosineAnnealingLR(opt, T_max=after) if cfg.scheduler == "cosine"
            else sched.ConstantLR(opt, factor=1.0, total_iters=0))
    if cfg.warmup_steps <= 1:
        return main
    # lr * 1/W, 2/W, ..., W/W over the first W steps
    warmup = sched.LinearLR(opt, start_factor=1.0 / cfg.warmup_steps, total_iters=cfg.warmup_steps - 1)
    return sched.SequentialLR(opt, [warmup, main], milestones=[cfg.warmup_steps])


def autocast(cfg: TrainParams, device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


@torch.no_grad()
def cached_outputs(teacher: nn.Module, forward: Callable[[nn.Module, Any], Outputs], train_set: Any,
                   hooks: ForwardHookManager, device: torch.device, chunk: int) -> Outputs:
    """The frozen teacher's outputs and tapped features for every training sample, `chunk` at a time."""
    n = len(train_set)
    parts = []
    for start in range(0, n, chunk):
        inputs, _, _ = to_device(train_set.__getitems__(torch.arange(start, min(start + chunk, n))), device)
        parts.append({**forward(teacher, inputs), **hooks.outputs()})
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def epoch_postfix(history: list[dict[str, float]]) -> dict[str, str]:
    """The bar's postfix: the latest train loss and the latest value of each validation metric
    (validation runs every `val_every` epochs, so it may be from an earlier row)."""
    latest: dict[str, float] = {}
    for row in history:
        latest.update({k: v for k, v in row.items() if k == "train_loss" or k.startswith("val_")})
    return {k: f"{v:.4g}" for k, v in latest.items()}


def fit(model: nn.Module, criterion: DistillationLoss, train_set: Any, cfg: TrainParams, *, seed: int,
        forward: Callable[[nn.Module, Any], Outputs], validate: Callable[[nn.Module], dict[str, float]],
        device: torch.device = torch.device("cpu"), teacher: nn.Module | None = None,
        taps: dict[str, tuple[str, ...]] | None = None, cache_batch: int | None = None,
        parallel: Parallel = SINGLE, checkpoint: Checkpointer | None = None,
        on_epoch: Callable[[dict[str, float]], None] | None = None,
        progress: str | None = None) -> list[dict[str, float]]:
    """Trains `model` (labels, or a distillation loss against a frozen `teacher`); one row per epoch.
    `progress`: the description of the epoch bar (tasks/platform/progress.py), e.g. the run's name."""
    taps, checkpoint = taps or {}, checkpoint or Checkpointer(None)
    n = len(train_set)
    model.to(device)
    teacher_out, t_hooks = None, None
    if criterion.needs_teacher:
        if teacher is None:
            raise ValueError("this loss needs a teacher")
        teacher.to(device).eval()
        t_hooks = ForwardHookManager.on(teacher, taps.get("teacher", ()))
        if cfg.cache_teacher:
            teacher_out = cached_outputs(teacher, forward, train_set, t_hooks, device, cache_batch or n)
    s_hooks = ForwardHookManager.on(model, taps.get("student", ()))
    net = model

    def outputs(batch: Any) -> tuple[Outputs, Outputs | None, Any]:
        inputs, targets, index = to_device(batch, device)
        student = {**forward(net, inputs), **s_hooks.outputs()}
        if not criterion.needs_teacher:
            return student, None, targets
        if teacher_out is not None:
            return student, {k: v[index] for k, v in teacher_out.items()}, targets
        with torch.no_grad():
            return student, {**forward(teacher, inputs), **t_hooks.outputs()}, targets

    criterion.to(device)
    # one forward pass before building the optimizer: losses with learned adapters create them lazily
    with torch.no_grad():
        criterion(*outputs(train_set.__getitems__(torch.arange(min(2, n)))))
    params = list(model.parameters()) + list(criterion.parameters())
    opt = build_optimizer(cfg, params)
    sampler = EpochBatches(n, cfg.batch_size, seed, parallel)
    sched = build_scheduler(cfg, opt, cfg.epochs * len(sampler))
    # its own generator: a DataLoader draws a seed for its workers at every epoch, from the global
    # RNG (which dropout uses) unless given one
    loader = torch.utils.data.DataLoader(train_set, batch_sampler=sampler, collate_fn=lambda batch: batch,
                                         pin_memory=device.type == "cuda", generator=torch.Generator())
    net = parallel.wrap(model)

    history: list[dict[str, float]] = []
    first_epoch, step, done, sums = 1, 0, 0, (0.0, {})
    state = checkpoint.load()
    if state is not None:  # resume exactly where the checkpoint was taken
        model.load_state_dict(state["model"])
        criterion.load_state_dict(state["criterion"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        parallel.set_rng_state(state["rng"][parallel.rank])
        first_epoch, step, done, sums, history = (state["epoch"], state["step"], state["done"],
                                                  state["sums"][parallel.rank], state["history"])
        sampler.restart(state["epoch_start"], done)

    # one bar per training, on the main rank only (every rank runs this loop); it reads the rows, never
    # the RNGs or the model, so the history is the same with it drawn or not
    bar = progress_bar(total=cfg.epochs, initial=first_epoch - 1, desc=progress or "training", unit="epoch",
                       enabled=parallel.is_main)
    try:
        for epoch in range(first_epoch, cfg.epochs + 1):
            net.train()
            t0, (loss_sum, parts_sum) = time.perf_counter(), sums
            for batch in loader:
                with autocast(cfg, device):
                    loss, parts = criterion(*outputs(batch))
                opt.zero_grad(set_to_none=True)
                (loss * parallel.loss_scale(len(batch[2]), sampler.global_size)).backward()
                parallel.average_gradients(criterion.parameters())
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                sched.step()
                step, done = step + 1, done + 1
                size = len(batch[2])
                loss_sum += loss.item() * size
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v * size
                if checkpoint.due(step):
                    # each rank's own RNG state and running sums; the weights are the same on all
                    rngs = parallel.gather(parallel.rng_state())
                    rank_sums = parallel.gather((loss_sum, dict(parts_sum)))
                    if parallel.is_main:
                        checkpoint.save({"model": model.state_dict(), "criterion": criterion.state_dict(),
                                         "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                         "rng": rngs, "epoch_start": sampler.epoch_start, "epoch": epoch,
                                         "step": step, "done": done, "history": history, "sums": rank_sums})
            s_hooks.pop_io_dict()  # the validation pass must not see (or grow) the tapped outputs
            loss_sum, *part_sums = parallel.sum([loss_sum, *parts_sum.values()])
            row = {"epoch": epoch, "train_loss": loss_sum / n, "epoch_seconds": time.perf_counter() - t0,
                   **{f"train_loss_{k}": v / n for k, v in zip(parts_sum, part_sums)},
                   **parallel.comm_stats()}
            if parallel.is_main and (epoch % cfg.val_every == 0 or epoch == cfg.epochs):
                row.update(validate(model))
            history.append(row)
            done, sums = 0, (0.0, {})
            if on_epoch:
                on_epoch(row)
            bar.set_postfix(epoch_postfix(history), refresh=False)
            bar.update()
    finally:
        bar.close()
        s_hooks.clear()
        if t_hooks is not None:
            t_hooks.clear()
    return history
