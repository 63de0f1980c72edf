"""The classification kind: labelled inputs, one model per role, accuracy on the test split.

Data: the digits stage's Parquet splits (`schema.py`). A role trains one model (unit None) and is
evaluated as it is; the labels-only loss is cross-entropy. No non-learned baselines.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from models import create_model

from .. import Unit, register_kind
from ..base import BatchedDataset
from .metrics import classification_metrics
from .schema import Split, load_splits


class LabelledSet(BatchedDataset):
    """(x[index], y[index], index) for a batch of indices."""

    def __init__(self, split: Split) -> None:
        self.x, self.y = split.x, split.y

    def __len__(self) -> int:
        return len(self.y)

    def __getitems__(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = torch.as_tensor(index)
        return self.x[index], self.y[index], index


class Classification:
    cadence = "nightly"  # of its deployments' schedules (flows/deploy.py)
    name = "classification"
    labels_loss = {"ce": {"weight": 1.0}}
    cache_batch = None  # the whole training split in one teacher pass
    val_key = "val_accuracy"
    val_higher_is_better = True
    composes = False  # a role's one trained model is the model it is evaluated as

    def load(self, data_dir: str, validate: bool = False) -> dict[str, Split]:
        return load_splits(data_dir, validate=validate)

    def units(self, spec: Any, role: str) -> list[Unit]:
        return [None]

    def compositions(self, spec: Any) -> list[tuple[str, str, tuple[Unit, ...]]]:
        return []

    def train_set(self, data: dict[str, Split], unit: Unit) -> LabelledSet:
        return LabelledSet(data["train"])

    def build(self, spec: Any, side: str, data: dict[str, Split], tp: Any) -> nn.Module:
        return create_model(spec.teacher if side == "teacher" else spec.student, **tp.model)

    def forward(self, model: nn.Module, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": model(inputs)}

    def validate(self, model: nn.Module, data: dict[str, Split], unit: Unit,
                 device: torch.device) -> dict[str, float]:
        val = data["val"]
        return {f"val_{k}": v for k, v in classification_metrics(model, val.x, val.y).items()}

    def predictor(self, model: nn.Module, data: dict[str, Split]) -> nn.Module:
        return model

    def baselines(self, spec: Any, data: dict[str, Split]) -> dict[str, Any]:
        return {}

    def test_metrics(self, predict: nn.Module, data: dict[str, Split], mp: Any) -> dict[str, float]:
        test = data["test"]
        return classification_metrics(predict, test.x, test.y)

    def input_example(self, data: dict[str, Split]) -> torch.Tensor:
        return data["train"].x[:4]

    def unit_name(self, unit: Unit) -> str:
        return ""

    def known_roles(self) -> set[str]:
        return set()  # no non-learned baselines


register_kind(Classification())
