"""Kinds: what a type of task (classification, forecast, localization, 3D detection) brings to the
one generic flow and train loop, in the manner of torchtitan's `TrainSpec`.

A kind is one object registered under its name, in a package of its own, `tasks/kinds/<name>/`:
`kind.py` (the object), `schema.py` (the data contract its stage writes and it reads), its Datasets
and metrics. The flow asks it, for a method:

    load(data_dir, validate)      the prepared splits (validated with the stage's own suites)
    units(spec, role)             what one role trains: [None] (one model) or lead times in hours
    compositions(spec)            roles built from trained units (Pangu's `iterated_1h`)
    train_set(data, unit)         a Dataset whose batched `__getitems__` gives (inputs, targets, index)
    build(spec, side, data, tp)   the teacher or student net for the data's shapes
    forward(model, inputs)        the outputs the loss terms read: {"logits"} or {"upper", "surface"}
    validate(model, data, unit)   per-epoch validation metrics {"val_...": ...}; `val_key` is the score
    compose(members)              trained units -> the evaluated model (when `composes`; else the
                                  role's single trained model is evaluated as it is)
    predictor(model, data)        what scoring calls, learned or not
    baselines(spec, data)         non-learned predictors (persistence, climatology)
    test_metrics(predict, data, mp)   the method's metrics on the test split
    known_roles()                 the baseline roles it provides
    check_params(spec, mp)        its own params keys (optional), e.g. a forecast's eval_leads
    report_figures(evaluations, data, teacher, mp, product)   extra figures on the flow's parent run
                                  (optional); `product` is the method's product model, when not the teacher
    score_chart(metric)           the DVC plot a test score is a point of, (chart, x) or None
                                  (optional): per lead time, per tIoU, per class (tasks/steps/report.py)

A new kind is its package plus a stage module and a model file; nothing in flows/ or the train loop
changes (tests/test_kind_seam.py runs a kind of its own through the flow).
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

if TYPE_CHECKING:  # the registry itself imports no torch: data stages import kinds' contracts
    import torch
    import torch.nn as nn

Unit = Optional[int]
Outputs = dict[str, "torch.Tensor"]
Predictor = Callable[..., Any]

_KINDS: dict[str, "Kind"] = {}


class Kind(Protocol):
    name: str
    labels_loss: dict[str, dict[str, Any]]   # the loss of a model trained on targets alone
    cache_batch: int | None                  # inputs per teacher pass when caching its outputs (None: all)
    val_key: str                             # the validation metric that picks models
    val_higher_is_better: bool
    composes: bool                           # units compose into one model (else one unit per role)
    cadence: str                             # "nightly" or "weekly": its deployments' schedules

    def load(self, data_dir: str, validate: bool = False) -> Any: ...
    def units(self, spec: Any, role: str) -> list[Unit]: ...
    def compositions(self, spec: Any) -> list[tuple[str, str, tuple[Unit, ...]]]: ...
    def train_set(self, data: Any, unit: Unit) -> torch.utils.data.Dataset: ...
    def build(self, spec: Any, side: str, data: Any, tp: Any) -> nn.Module: ...
    def forward(self, model: nn.Module, inputs: Any) -> Outputs: ...
    def validate(self, model: nn.Module, data: Any, unit: Unit, device: torch.device) -> dict[str, float]: ...
    def compose(self, members: dict[Unit, nn.Module]) -> nn.Module: ...
    def predictor(self, model: nn.Module, data: Any) -> Predictor: ...
    def baselines(self, spec: Any, data: Any) -> dict[str, Predictor]: ...
    def test_metrics(self, predict: Predictor, data: Any, mp: Any) -> dict[str, float]: ...
    def input_example(self, data: Any) -> torch.Tensor | None: ...
    def unit_name(self, unit: Unit) -> str: ...
    def known_roles(self) -> set[str]: ...


def register_kind(kind: "Kind") -> "Kind":
    _KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> "Kind":
    """The kind registered as `name`, importing `tasks.kinds.<name>.kind` on first use (so a method
    imports only its own kind's code)."""
    if name not in _KINDS and name in _packaged():
        importlib.import_module(f"{__name__}.{name}.kind")
    if name not in _KINDS:
        raise KeyError(f"unknown kind {name!r}; kinds: {list_kinds()}")
    return _KINDS[name]


def list_kinds() -> list[str]:
    return sorted(set(_KINDS) | set(_packaged()))


def _packaged() -> list[str]:
    return [m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.ispkg]
