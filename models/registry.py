"""Registries of models and methods, in the manner of timm's `register_model` / `create_model`.

A *model* is an entrypoint function that returns an `nn.Module`; its name is the function's name.
A *method* is one `MethodSpec`: which data stage feeds it, which registered models are its teacher and
student, which distillation loss terms join them, how it is scored and what claim the pipeline checks.
Adding a method means one model file (its entrypoints) and one `register_method(...)` call in it.

    >>> from models import create_model, get_method
    >>> spec = get_method("hinton_kd")
    >>> teacher = create_model(spec.teacher)
"""
from __future__ import annotations

import operator
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn

_model_entrypoints: dict[str, Callable[..., nn.Module]] = {}
_methods: dict[str, "MethodSpec"] = {}


# ---------------------------------------------------------------------------------------------------
# models

def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: registers `fn` under its own name as a model entrypoint."""
    name = fn.__name__
    if name in _model_entrypoints:
        warnings.warn(f"model entrypoint {name!r} registered twice; the later one wins", stacklevel=2)
    _model_entrypoints[name] = fn
    return fn


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Builds a registered model. A kwarg given as None means "use the entrypoint's default"."""
    if name not in _model_entrypoints:
        raise RuntimeError(f"unknown model {name!r}; registered: {sorted(_model_entrypoints)}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return _model_entrypoints[name](**kwargs)


def list_models(filter: str = "") -> list[str]:
    return sorted(n for n in _model_entrypoints if filter in n)


def is_model(name: str) -> bool:
    return name in _model_entrypoints


# ---------------------------------------------------------------------------------------------------
# claims

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
}
_IDENT = r"([A-Za-z_]\w*)"
_CLAIM_RE = re.compile(rf"^\s*{_IDENT}\.{_IDENT}\s*(>=|<=|>|<)\s*{_IDENT}\.{_IDENT}\s*$")


@dataclass(frozen=True)
class Claim:
    """A comparison between two roles' metrics, e.g. ``student_kd.accuracy > student_labels.accuracy``.

    Each side is averaged over the seeds the flow ran; the verdict compares the means.
    """
    left_role: str
    left_metric: str
    op: str
    right_role: str
    right_metric: str

    @classmethod
    def parse(cls, statement: str) -> "Claim":
        m = _CLAIM_RE.match(statement)
        if not m:
            raise ValueError(
                f"cannot parse claim {statement!r}: expected '<role>.<metric> <op> <role>.<metric>' "
                f"with op in {sorted(_OPS)}")
        return cls(*m.groups())

    @property
    def statement(self) -> str:
        return f"{self.left_role}.{self.left_metric} {self.op} {self.right_role}.{self.right_metric}"

    @property
    def roles(self) -> tuple[str, str]:
        return (self.left_role, self.right_role)

    def holds(self, left: float, right: float) -> bool:
        return _OPS[self.op](left, right)


# ---------------------------------------------------------------------------------------------------
# methods

@dataclass(frozen=True)
class MethodSpec:
    """Everything the generic flow needs to know about one method.

    Roles: ``teacher`` (trained on labels), ``student_kd`` (the student distilled from the teacher with
    ``loss``) and one role per entry of ``baselines``; ``student_labels`` is the same student trained on
    labels alone with the same budget and seeds.
    """
    name: str
    data_stage: str                  # DVC stage (and tasks module) whose output feeds the method
    teacher: str                     # model entrypoint names, built through create_model
    student: str | None              # None: the method has no distilled student
    loss: dict[str, dict[str, Any]]  # loss-term name -> kwargs (incl. "weight"), see models.distill
    primary_metric: str
    higher_is_better: bool
    baselines: tuple[str, ...]
    claim: str | tuple[str, ...]     # one comparison, or several that must all hold
    # module paths whose outputs the loss terms read (torchdistill's forward_hook), per side
    feature_taps: dict[str, tuple[str, ...]] = field(default_factory=dict)
    kind: str = "classification"     # which flow runs it: "classification" or "forecast"
    leads: tuple[int, ...] = ()      # forecast: lead times (hours) of the teacher's models
    description: str = ""

    def __post_init__(self) -> None:
        known = set(self.roles)
        for claim in self.claims:  # parsed now: fail at import time, not after an hour of training
            unknown = set(claim.roles) - known
            if unknown:
                raise ValueError(f"method {self.name!r}: claim names unknown roles {sorted(unknown)}; "
                                 f"roles are {sorted(known)}")

    @property
    def claims(self) -> list[Claim]:
        statements = (self.claim,) if isinstance(self.claim, str) else self.claim
        return [Claim.parse(s) for s in statements]

    @property
    def roles(self) -> tuple[str, ...]:
        return ("teacher", *(("student_kd",) if self.student else ()), *self.baselines)


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.name in _methods:
        warnings.warn(f"method {spec.name!r} registered twice; the later one wins", stacklevel=2)
    for model in (spec.teacher, spec.student):
        if model is not None and not is_model(model):
            raise RuntimeError(f"method {spec.name!r} names unregistered model {model!r}")
    _methods[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    if name not in _methods:
        raise KeyError(f"unknown method {name!r}; registered: {sorted(_methods)}")
    return _methods[name]


def list_methods() -> list[str]:
    return sorted(_methods)
