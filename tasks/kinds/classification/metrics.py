"""Classification scores: accuracy and mean cross-entropy."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.no_grad()
def classification_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                           batch_size: int = 1024) -> dict[str, float]:
    """Accuracy and mean cross-entropy of `model` on (x, y), in batches on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    correct, loss_sum = 0, 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(-1) == yb).sum())
    return {"accuracy": correct / len(x), "loss": loss_sum / len(x)}
