"""Training checkpoints: written atomically every N optimizer steps, read back to resume.

A checkpoint holds everything the loop's future depends on: weights (model and learned loss adapters),
optimizer and scheduler state, the sampler's generator at the start of the current epoch and how many
of its batches are done, the global RNG (dropout), the epoch's running sums and the history so far.
So a run killed at any moment and started again reaches the same final weights as one that never
stopped (tests/test_train_loop.py kills one with SIGKILL).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..platform.common import atomic_path


class Checkpointer:
    def __init__(self, path: str | os.PathLike | None, every: int = 0) -> None:
        self.path = Path(path) if path else None
        self.every = every

    def due(self, step: int) -> bool:
        return self.path is not None and self.every > 0 and step % self.every == 0

    def save(self, state: dict[str, Any]) -> None:
        with atomic_path(self.path) as tmp:  # a reader sees the previous checkpoint or this one, whole
            torch.save(state, tmp)

    def load(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.is_file():
            return None
        # tensors, numbers, strings and containers only: a checkpoint file is never unpickled as code
        return torch.load(self.path, map_location="cpu", weights_only=True)

    def clear(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
