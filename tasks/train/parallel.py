"""Where data parallelism plugs into the train loop (a seam; the loop itself is single-process code).

`Parallel` says how one optimizer step is spread over processes:

    parallelize(model)  wraps the model, e.g. in DistributedDataParallel (identity by default)
    comm_hook           (state, hook) registered on the wrapped model: how gradients are exchanged
                        (`DistributedDataParallel.register_comm_hook`; tasks/train/comm_hooks.py)
    shard(batch)        this rank's part of a global batch of sample indices

and gives the loop the few collectives it needs besides DDP's own: epoch sums, gradients of
parameters outside the wrapped model (a loss's learned adapters), per-rank RNG states for a
checkpoint. The default, `SINGLE`, is one process and every collective is the identity;
tasks/train/distributed.py builds the torchrun/DDP one from `methods.<m>.<role>.parallel`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn


def _identity(model: nn.Module) -> nn.Module:
    return model


@dataclass(frozen=True)
class Parallel:
    world_size: int = 1
    rank: int = 0
    parallelize: Callable[[nn.Module], nn.Module] = _identity
    comm_hook: tuple[Any, Callable[..., Any]] | None = None

    @property
    def is_main(self) -> bool:
        """The rank that logs, checkpoints and registers."""
        return self.rank == 0

    @property
    def hook_state(self) -> Any:
        """The communication hook's state (comm_hooks.CommState: bytes counted, rounding keyed), or
        None without a hook."""
        return self.comm_hook[0] if self.comm_hook else None

    def wrap(self, model: nn.Module) -> nn.Module:
        net = self.parallelize(model)
        if self.comm_hook is not None:
            net.register_comm_hook(*self.comm_hook)
        return net

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """Every world_size-th index from this rank's position: equal parts of the same global batch."""
        return batch if self.world_size == 1 else batch[self.rank::self.world_size]

    def loss_scale(self, local: int, global_: int) -> float:
        """DDP averages the ranks' gradients; each rank's loss is a mean over its own shard. Scaling it
        by world_size * local / global makes the average the gradient of the global batch's mean even
        when the last batch does not split evenly."""
        return 1.0 if self.world_size == 1 else self.world_size * local / global_

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks (float64, so epoch sums of losses add up exactly enough)."""
        if self.world_size == 1:
            return values
        import torch.distributed as dist
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def average_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Averages gradients DDP does not see: parameters that live outside the wrapped model."""
        if self.world_size == 1:
            return
        import torch.distributed as dist
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world_size

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (a checkpoint keeps each rank's RNG state)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def rng_state(self) -> dict[str, torch.Tensor | None]:
        """This rank's random state: the global CPU generator (dropout, augmentation) and the
        communication hook's, if it draws (TernGrad's stochastic rounding: its step count)."""
        state = self.hook_state
        return {"cpu": torch.get_rng_state(), "comm": state.rng_state() if hasattr(state, "rng_state") else None}

    def set_rng_state(self, saved: dict[str, torch.Tensor | None]) -> None:
        torch.set_rng_state(saved["cpu"])
        if hasattr(self.hook_state, "set_rng_state"):
            self.hook_state.set_rng_state(saved["comm"])

    def comm_stats(self) -> dict[str, float]:
        """What the communication hook counted since the last call (`comm_*` metrics), if it counts."""
        return self.hook_state.take() if hasattr(self.hook_state, "take") else {}


SINGLE = Parallel()
