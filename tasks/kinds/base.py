"""What every kind's Datasets share: batched fetching and moving batches to a device."""
from __future__ import annotations

from typing import Any

import torch


class BatchedDataset(torch.utils.data.Dataset):
    """A Dataset fetched a batch at a time: the DataLoader passes a batch's indices to `__getitems__`
    (PyTorch >= 2.2), which gathers them with one indexing op per tensor instead of per sample."""

    def __getitems__(self, index: torch.Tensor) -> tuple[Any, Any, torch.Tensor]:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple[Any, Any, torch.Tensor]:
        return self.__getitems__(torch.tensor([i]))


def to_device(x: Any, device: torch.device) -> Any:
    """Tensors (in tuples, lists and dicts) moved to `device`."""
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x
