"""Scoring models on a split, and checking a method's claim over seeds."""
from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.registry import Claim


@torch.no_grad()
def classification_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                           batch_size: int = 1024) -> dict[str, float]:
    """Accuracy and mean cross-entropy of `model` on (x, y)."""
    model.eval()
    device = next(model.parameters()).device
    correct, loss_sum = 0, 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(-1) == yb).sum())
    return {"accuracy": correct / len(x), "loss": loss_sum / len(x)}


def summarize(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and range over seeds."""
    return {"mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values), "values": list(values)}


def check_claim(claim: Claim, scores: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Compares the seed means of the two sides of `claim`.

    `scores[role][metric]` holds one value per seed. The verdict carries the statement, both means with
    their spread, and `passed`.
    """
    left = summarize(scores[claim.left_role][claim.left_metric])
    right = summarize(scores[claim.right_role][claim.right_metric])
    return {"statement": claim.statement, "left": left, "right": right,
            "difference": left["mean"] - right["mean"], "passed": claim.holds(left["mean"], right["mean"])}


def check_claims(claims: list[Claim], scores: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """All parts must hold. A single claim's verdict is returned as it is; a compound one lists its
    parts and counts the failures."""
    parts = [check_claim(c, scores) for c in claims]
    if len(parts) == 1:
        return parts[0]
    return {"statement": " and ".join(p["statement"] for p in parts), "parts": parts,
            "failed_parts": sum(not p["passed"] for p in parts), "difference": float("nan"),
            "passed": all(p["passed"] for p in parts)}


def evaluate_models(spec, data_dir: str, trained: list, ctx) -> list[dict[str, Any]]:
    """Scores every trained model on the held-out test split, as loaded back from MLflow (so what is
    scored is what was logged), and adds `test_<metric>` to each model's run."""
    from . import tracking
    from .train import load_data

    test = load_data(spec, data_dir)["test"]
    evaluations = []
    for tm in sorted(trained, key=lambda t: (t.role, t.seed)):
        metrics = classification_metrics(tracking.load_model(tm.model_uri, ctx), test.x, test.y)
        tracking.log_metrics(tm.run_id, {f"test_{k}": v for k, v in metrics.items()}, ctx)
        evaluations.append({"role": tm.role, "seed": tm.seed, "run_id": tm.run_id, "metrics": metrics})
    return evaluations


def by_role(evaluations: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """`scores[role][metric]` with one value per seed, in seed order."""
    scores: dict[str, dict[str, list[float]]] = {}
    for e in sorted(evaluations, key=lambda e: (e["role"], e["seed"])):
        for k, v in e["metrics"].items():
            scores.setdefault(e["role"], {}).setdefault(k, []).append(v)
    return scores
