"""Where data parallelism plugs into the train loop (a seam; the loop itself is single-process code).

`Parallel` says how one optimizer step is spread over processes:

    parallelize(model)  wraps the model, e.g. in DistributedDataParallel (identity by default)
    comm_hook           (state, hook) registered on the wrapped model: how gradients are exchanged
                        (`DistributedDataParallel.register_comm_hook`, e.g. a compressing hook)
    shard(batch)        this rank's part of a global batch of sample indices

The default, `SINGLE`, is one process. torchrun/DDP and gradient-compression hooks fill these in
without touching the loop (tests/test_train_loop.py runs a real one-process gloo DDP with a hook).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

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

    def wrap(self, model: nn.Module) -> nn.Module:
        net = self.parallelize(model)
        if self.comm_hook is not None:
            net.register_comm_hook(*self.comm_hook)
        return net

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """Every world_size-th index from this rank's position: equal parts of the same global batch."""
        return batch if self.world_size == 1 else batch[self.rank::self.world_size]


SINGLE = Parallel()
