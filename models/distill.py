"""Knowledge-distillation machinery in plain PyTorch: feature taps and a registry of loss terms.

Feature taps follow torchdistill's forward hooks: name a module by its dotted path and its output is
captured on every forward pass. Loss terms read a dict per side,
``{"logits": Tensor, "<module path>": Tensor, ...}``, so a method picks its terms and taps by name
(in its `MethodSpec.loss`) instead of writing a training loop.

References: Hinton et al. 2015 (logit KD); Romero et al. 2015, FitNets (hints through a learned
regressor); Park et al. 2019, Relational KD (distance-wise relation loss).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

Outputs = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------
# feature taps

class ForwardHookManager:
    """Captures the outputs (and optionally inputs) of named submodules.

        >>> hooks = ForwardHookManager()
        >>> hooks.add_hook(model, "features")
        >>> logits = model(x); feats = hooks.pop_io_dict()["features"]["output"]
    """

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._io: dict[str, dict[str, Any]] = {}

    @classmethod
    def on(cls, model: nn.Module, paths: tuple[str, ...] | list[str]) -> "ForwardHookManager":
        """A manager tapping the outputs of `paths` in `model`."""
        hooks = cls()
        for path in paths:
            hooks.add_hook(model, path)
        return hooks

    def add_hook(self, root: nn.Module, module_path: str, requires_input: bool = False,
                 requires_output: bool = True) -> None:
        module = root.get_submodule(module_path)  # raises AttributeError naming the missing part

        def hook(_module: nn.Module, inputs: tuple, output: Any) -> None:
            entry = self._io.setdefault(module_path, {})
            if requires_input:
                entry["input"] = inputs[0] if len(inputs) == 1 else inputs
            if requires_output:
                entry["output"] = output

        self._handles.append(module.register_forward_hook(hook))

    def pop_io_dict(self) -> dict[str, dict[str, Any]]:
        io, self._io = self._io, {}
        return io

    def outputs(self) -> dict[str, torch.Tensor]:
        """The captured outputs keyed by module path (and forgets them)."""
        return {path: entry["output"] for path, entry in self.pop_io_dict().items() if "output" in entry}

    def clear(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._io.clear()


def forward_with_taps(model: nn.Module, x: torch.Tensor, hooks: ForwardHookManager | None) -> Outputs:
    """Runs `model` and returns its logits together with the tapped features."""
    logits = model(x)
    out = {"logits": logits}
    if hooks is not None:
        out.update(hooks.outputs())
    return out


# ---------------------------------------------------------------------------------------------------
# loss registry

_LOSSES: dict[str, type[nn.Module]] = {}


def register_loss(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        _LOSSES[name] = cls
        return cls
    return deco


def list_losses() -> list[str]:
    return sorted(_LOSSES)


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    if name not in _LOSSES:
        raise KeyError(f"unknown loss term {name!r}; registered: {list_losses()}")
    return _LOSSES[name](**kwargs)


@register_loss("ce")
class LabelCrossEntropy(nn.Module):
    """Cross-entropy of the student's logits against the labels."""
    needs_teacher = False

    def forward(self, student: Outputs, teacher: Outputs | None, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(student["logits"], targets)


@register_loss("kd")
class LogitKD(nn.Module):
    """Hinton's KD: T² · KL(softmax(z_t/T) ‖ softmax(z_s/T)), averaged over the batch.

    The T² factor keeps the gradient scale independent of T (Hinton et al. 2015, §2).
    """
    needs_teacher = True

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, student: Outputs, teacher: Outputs, targets: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        log_p_s = F.log_softmax(student["logits"] / t, dim=-1)
        log_p_t = F.log_softmax(teacher["logits"] / t, dim=-1)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * t * t


@register_loss("hint")
class HintLoss(nn.Module):
    """FitNets hint: MSE between a learned adapter of the student's feature and the teacher's.

    The adapter (a linear map, or a 1×1 conv for feature maps) is built on the first call, when the
    shapes are known, so call the loss once on a batch before building the optimizer.
    """
    needs_teacher = True

    def __init__(self, student_key: str, teacher_key: str) -> None:
        super().__init__()
        self.student_key, self.teacher_key = student_key, teacher_key
        self.adapter: nn.Module | None = None

    def _build_adapter(self, s: torch.Tensor, t: torch.Tensor) -> nn.Module:
        if s.dim() == 2 and t.dim() == 2:
            return nn.Linear(s.shape[1], t.shape[1])
        if s.dim() == 4 and t.dim() == 4 and s.shape[2:] == t.shape[2:]:
            return nn.Conv2d(s.shape[1], t.shape[1], kernel_size=1)
        if s.dim() == 5 and t.dim() == 5 and s.shape[1:-1] == t.shape[1:-1]:
            return nn.Linear(s.shape[-1], t.shape[-1])  # channels-last token cubes (B, Z, H, W, C)
        raise ValueError(f"hint: cannot adapt student feature {tuple(s.shape)} to teacher {tuple(t.shape)}")

    def forward(self, student: Outputs, teacher: Outputs, targets: torch.Tensor) -> torch.Tensor:
        s, t = student[self.student_key], teacher[self.teacher_key]
        if self.adapter is None:
            self.adapter = self._build_adapter(s, t).to(s.device)
        return F.mse_loss(self.adapter(s), t.detach())


def pairwise_distance_normalized(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between all rows of x, divided by their mean over distinct pairs."""
    x = x.flatten(1)
    d = torch.cdist(x, x)  # (B, B)
    off_diag = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    return d / d[off_diag].mean().clamp_min(1e-12)


@register_loss("relation")
class DistanceRelationKD(nn.Module):
    """RKD distance-wise loss: Huber between normalised pairwise-distance matrices of both sides."""
    needs_teacher = True

    def __init__(self, student_key: str = "logits", teacher_key: str = "logits") -> None:
        super().__init__()
        self.student_key, self.teacher_key = student_key, teacher_key

    def forward(self, student: Outputs, teacher: Outputs, targets: torch.Tensor) -> torch.Tensor:
        d_s = pairwise_distance_normalized(student[self.student_key])
        with torch.no_grad():
            d_t = pairwise_distance_normalized(teacher[self.teacher_key])
        off_diag = ~torch.eye(len(d_s), dtype=torch.bool, device=d_s.device)
        return F.smooth_l1_loss(d_s[off_diag], d_t[off_diag])


FORECAST_KEYS = ("upper", "surface")  # what a forecast model's outputs are called (models.weather)


def mean_field_l1(pred: Outputs, truth: Outputs) -> torch.Tensor:
    """Mean absolute error per forecast field, averaged over the fields the data have: surface-only
    or upper-air-only data leave one of them empty, and the mean of an empty tensor is NaN."""
    losses = [F.l1_loss(pred[k], truth[k]) for k in FORECAST_KEYS if truth[k].numel()]
    return sum(losses) / len(losses)


@register_loss("forecast_l1")
class ForecastL1(nn.Module):
    """Mean absolute error of each forecast field against the truth, averaged over the fields
    (Pangu-Weather trains with an MAE loss on normalised fields)."""
    needs_teacher = False

    def forward(self, student: Outputs, teacher: Outputs | None, targets: Outputs) -> torch.Tensor:
        return mean_field_l1(student, targets)


@register_loss("forecast_kd")
class ForecastOutputKD(nn.Module):
    """Output distillation for regression: MAE between the student's and the teacher's forecasts."""
    needs_teacher = True

    def forward(self, student: Outputs, teacher: Outputs, targets: Outputs) -> torch.Tensor:
        return mean_field_l1(student, {k: teacher[k].detach() for k in FORECAST_KEYS})


class DistillationLoss(nn.Module):
    """Weighted sum of registered loss terms, e.g. ``{"kd": {"weight": 0.9, "temperature": 4},
    "ce": {"weight": 0.1}}``. Returns the total and each weighted term (for logging)."""

    def __init__(self, terms: dict[str, dict[str, Any]]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("a distillation loss needs at least one term")
        self.weights: dict[str, float] = {}
        self.terms = nn.ModuleDict()
        for name, cfg in terms.items():
            cfg = dict(cfg)
            self.weights[name] = float(cfg.pop("weight", 1.0))
            self.terms[name] = create_loss(name, **cfg)

    @property
    def needs_teacher(self) -> bool:
        return any(term.needs_teacher for term in self.terms.values())

    def forward(self, student: Outputs, teacher: Outputs | None,
                targets: torch.Tensor | Outputs) -> tuple[torch.Tensor, dict[str, float]]:
        total = torch.zeros((), device=next(iter(student.values())).device)
        parts = {}
        for name, term in self.terms.items():
            value = self.weights[name] * term(student, teacher, targets)
            parts[name] = float(value.detach())
            total = total + value
        return total, parts
