"""Small image classifiers for the handwritten-digits methods (8×8 grey images, 10 classes).

Input is a flat (B, 64) tensor of pixel intensities scaled to [0, 1]; both nets expose
`forward_features` / `forward_head` (timm's interface) and a `features` submodule that KD taps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .registry import register_model

__all__ = ["DigitsCNN", "DigitsMLP"]


@dataclass
class DigitsCNNConfig:
    num_classes: int = 10
    image_size: int = 8
    width: int = 32        # channels of the first conv; the next blocks double it
    dropout: float = 0.1


class DigitsCNN(nn.Module):
    """Teacher: three 3×3 conv blocks (BN, ReLU), a 2× pool after the second, global average pool."""

    def __init__(self, config: DigitsCNNConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]

        self.features = nn.Sequential(
            *block(1, w), *block(w, 2 * w), nn.MaxPool2d(2),   # (B, 2w, 4, 4)
            *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 4w)
        )
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(4 * w, config.num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        s = self.config.image_size
        return self.features(x.view(-1, 1, s, s))

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@dataclass
class DigitsMLPConfig:
    num_classes: int = 10
    in_features: int = 64
    hidden: int = 16


class DigitsMLP(nn.Module):
    """Student: one hidden layer. At hidden=16 it has ~1.2k parameters, ~80× fewer than the teacher."""

    def __init__(self, config: DigitsMLPConfig) -> None:
        super().__init__()
        self.config = config
        self.features = nn.Sequential(nn.Linear(config.in_features, config.hidden), nn.ReLU())
        self.head = nn.Linear(config.hidden, config.num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def digits_cnn(**kwargs) -> DigitsCNN:
    """Teacher CNN for 8×8 digits, ~100k parameters."""
    return DigitsCNN(DigitsCNNConfig(**kwargs))


@register_model
def digits_mlp_tiny(**kwargs) -> DigitsMLP:
    """Student MLP 64-16-10."""
    return DigitsMLP(DigitsMLPConfig(**dict(dict(hidden=16), **kwargs)))
