"""Method declarations: one `MethodSpec` per file of this package, `tasks/methods/<name>.py`.

A method names its kind, its data stage, its teacher and student models (entrypoints of `models/`),
its distillation loss terms and feature taps, how it is scored, its baselines and the claim the
pipeline checks. Declarations live here rather than in `models/`: they are about data stages,
claims and baselines, which `models/` (plain architectures) must not know; and one file per method
means adding a method adds a file, leaving every other method's code (and DVC stage) untouched.

`register_method` checks a declaration when its file is imported, so a mistake fails before anything
trains: unknown models, loss terms or kwargs, feature-tap paths missing on the built models, claim
roles that no step produces. `resolve` checks a method's params block against its declaration.

    >>> from tasks.methods import get_method
    >>> get_method("hinton_kd").claims[0].statement
    'student_kd.accuracy > student_labels.accuracy'
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models import create_model, is_model, model_family
from models.distill import create_loss, list_losses

from ..kinds import get_kind
from ..platform.common import StageError
from ..platform.params import PARAMS_FILE, MethodParams, Params, load_params
from ..steps.plan import PRODUCT_ROLE, RECIPES  # how roles, seeds and units become jobs

_METHODS: dict[str, "MethodSpec"] = {}
TRAINED_BASELINES = ("student_labels",)  # the student on targets alone, same budget and seeds


# ---------------------------------------------------------------------------------------------------
# claims

_OPS = (">=", "<=", ">", "<")
_IDENT = r"([A-Za-z_]\w*)"
_NUM = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
_CLAIM_RE = re.compile(rf"^\s*{_IDENT}\.{_IDENT}\s*(>=|<=|>|<)\s*(?:{_NUM}\s*\*\s*)?{_IDENT}\.{_IDENT}"
                       rf"\s*(?:([+-])\s*{_NUM})?\s*$")


def _number(x: float) -> str:
    return f"{x:g}"


@dataclass(frozen=True)
class Claim:
    """A comparison of two roles' metrics, checked over seeds (tasks/steps/claims.py), e.g.
    ``student_kd.accuracy > student_labels.accuracy``. The right side may be scaled and shifted, for
    a claim of a ratio or a margin: ``student_labels.gflops <= 0.6 * teacher.gflops`` (a cut of 40%),
    ``student_labels.car_bev_ap >= teacher.car_bev_ap - 0.02`` (within 2 points)."""
    left_role: str
    left_metric: str
    op: str
    right_role: str
    right_metric: str
    factor: float = 1.0
    offset: float = 0.0

    @classmethod
    def parse(cls, statement: str) -> "Claim":
        m = _CLAIM_RE.match(statement)
        if not m:
            raise ValueError(
                f"cannot parse claim {statement!r}: expected '<role>.<metric> <op> [<number> *] <role>.<metric> "
                f"[+|- <number>]' with op in {sorted(_OPS)}")
        left_role, left_metric, op, factor, right_role, right_metric, sign, offset = m.groups()
        return cls(left_role, left_metric, op, right_role, right_metric, float(factor or 1.0),
                   (-1.0 if sign == "-" else 1.0) * float(offset or 0.0))

    @property
    def statement(self) -> str:
        right = f"{self.right_role}.{self.right_metric}"
        if self.factor != 1.0:
            right = f"{_number(self.factor)} * {right}"
        if self.offset:
            right += f" {'-' if self.offset < 0 else '+'} {_number(abs(self.offset))}"
        return f"{self.left_role}.{self.left_metric} {self.op} {right}"

    def bound(self, right: float) -> float:
        """What the left side is compared with, given the right side's value."""
        return self.factor * right + self.offset

    @property
    def roles(self) -> tuple[str, str]:
        return (self.left_role, self.right_role)

    @property
    def sign(self) -> int:
        """+1 when the claim says left exceeds right, -1 when it says left is below."""
        return 1 if self.op in (">", ">=") else -1

    @property
    def strict(self) -> bool:
        return self.op in (">", "<")


# ---------------------------------------------------------------------------------------------------
# methods

@dataclass(frozen=True)
class MethodSpec:
    """Everything the generic flow needs to know about one method.

    Roles: ``teacher``; ``student_kd`` (the student distilled from the teacher with ``loss``); one
    role per entry of ``baselines``: ``student_labels`` (the same student on targets alone, same
    budget and seeds) or a role the kind provides (persistence, climatology, iterated_1h).
    """
    name: str
    kind: str                        # tasks/kinds/<kind>: data, units, metrics, baselines
    data_stage: str                  # the DVC stage whose output feeds the method
    teacher: str                     # model entrypoint names, built through create_model
    student: str | None              # None: the method has no distilled student
    loss: dict[str, dict[str, Any]]  # loss-term name -> kwargs (incl. "weight"), see models.distill
    primary_metric: str
    higher_is_better: bool
    baselines: tuple[str, ...]
    claim: str | tuple[str, ...]     # one comparison, or several that must all hold
    recipe: str = "distill"          # tasks/steps/plan.py: "distill", "teacher_only" or "compare"
    # module paths whose outputs the loss terms read (torchdistill's forward_hook), per side
    feature_taps: dict[str, tuple[str, ...]] = field(default_factory=dict)
    leads: tuple[int, ...] = ()      # forecast: lead times (hours) of the teacher's models
    description: str = ""

    def __post_init__(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"method {self.name!r}: recipe must be one of {sorted(RECIPES)}, got {self.recipe!r}")
        if (self.recipe == "teacher_only") == (self.student is not None):
            raise ValueError(f"method {self.name!r}: recipe {self.recipe} "
                             f"{'takes no' if self.recipe == 'teacher_only' else 'needs a'} student")
        if self.recipe == "compare" and "student_labels" not in self.baselines:
            raise ValueError(f"method {self.name!r}: recipe compare trains the student on targets alone: "
                             f"baselines must include 'student_labels'")
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
        return ("teacher", *(("student_kd",) if self.recipe == "distill" else ()), *self.baselines)

    @property
    def product_role(self) -> str:
        """The role registered under the method's name (its best seed on validation)."""
        return PRODUCT_ROLE[self.recipe]


def register_method(spec: MethodSpec) -> MethodSpec:
    """Checks `spec` against the model, loss and kind registries and registers it."""
    where = f"method {spec.name!r}"
    for model in (spec.teacher, spec.student):
        if model is not None and not is_model(model):
            raise RuntimeError(f"{where} names unregistered model {model!r}")
    kind = get_kind(spec.kind)
    provided = set(TRAINED_BASELINES) | set(getattr(kind, "known_roles", lambda: set())())
    unknown = set(spec.baselines) - provided
    if unknown:
        raise ValueError(f"{where}: no step produces baseline(s) {sorted(unknown)} (kind {spec.kind} "
                         f"provides {sorted(provided)})")
    for name, kwargs in spec.loss.items():
        if name not in list_losses():
            raise ValueError(f"{where}: unknown loss term {name!r}; registered: {list_losses()}")
        try:
            create_loss(name, **{k: v for k, v in kwargs.items() if k != "weight"})
        except TypeError as e:
            raise ValueError(f"{where}: loss term {name!r}: {e}") from None
    for side, paths in spec.feature_taps.items():
        entry = spec.teacher if side == "teacher" else spec.student
        model = create_model(entry)
        for path in paths:
            try:
                model.get_submodule(path)
            except AttributeError:
                raise ValueError(f"{where}: feature tap {side}:{path!r} is not a module of {entry}") from None
    _METHODS[spec.name] = spec
    return spec


def list_methods() -> list[str]:
    """Every declaration file in this package (importing none of them)."""
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                  if not m.ispkg and not m.name.startswith("_"))


def get_method(name: str) -> MethodSpec:
    """The method declared in `tasks/methods/<name>.py` (imported on first use)."""
    if name not in _METHODS and name in list_methods():
        importlib.import_module(f"{__name__}.{name}")
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; declared: {list_methods()}")
    return _METHODS[name]


# ---------------------------------------------------------------------------------------------------
# a method together with its params block

def resolve(method: str, params_file: str | os.PathLike = PARAMS_FILE) -> tuple[MethodSpec, MethodParams, Params]:
    """The declaration, its validated `methods.<method>` block and the whole params, or a StageError
    naming params.yaml's key when they disagree; runs before anything trains."""
    params = load_params(params_file)
    key = f"methods.{method}"
    if method not in params.methods:
        raise StageError(params_file, f"{key}: no such method in params.yaml; methods: {sorted(params.methods)}")
    mp = params.methods[method]
    try:
        spec = get_method(method)
    except KeyError:
        raise StageError(params_file, f"{key}: no declaration tasks/methods/{method}.py; "
                                       f"declared: {list_methods()}") from None
    if mp.kind != spec.kind:
        raise StageError(params_file, f"{key}.kind: {spec.name} is a {spec.kind} method, got {mp.kind!r}")
    for side, model in (("teacher", spec.teacher), ("student", spec.student)):
        if model is not None and model_family(model) != mp.models:
            raise StageError(params_file, f"{key}.models: {model} is defined in models/{model_family(model)}.py, "
                                           f"got {mp.models!r}")
    if spec.student is not None and mp.student is None:
        raise StageError(params_file, f"{key}.student: required, {spec.name} distils a student")
    for term in mp.loss:
        if term not in spec.loss:
            raise StageError(params_file, f"{key}.loss.{term}: not a loss term of {spec.name} "
                                           f"(its terms: {', '.join(sorted(spec.loss)) or 'none'})")
    check = getattr(get_kind(spec.kind), "check_params", None)
    if check is not None:
        problem = check(spec, mp)  # a kind's own keys, e.g. a forecast's eval_leads
        if problem:
            raise StageError(params_file, f"{key}.{problem}")
    return spec, mp, params


def loss_terms(spec: MethodSpec, overrides: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """The method's loss terms from its declaration, with params.yaml's values on top."""
    terms = {name: dict(cfg) for name, cfg in spec.loss.items()}
    for name, cfg in (overrides or {}).items():
        terms[name].update(cfg)
    return terms
