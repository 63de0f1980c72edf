"""A method's plan: which (role, unit, seed) jobs train, and which trained units compose into the model
each role is evaluated as. Chosen by the method's recipe; pure (no Prefect, MLflow or torch), so
the generic flow (flows/method.py) only walks it.

    plan(spec, seeds, units, compositions) -> Plan

Recipes:
    distill        one teacher (the first seed), then per seed a student distilled from it and the
                   same student on targets alone (the claim compares the two students, by seed)
    teacher_only   one teacher per seed (the claim is about the teacher, compared over seeds)
    compare        per seed a reference model (the teacher role) and the student on targets alone,
                   nothing distilled: a method that is a cheaper model checked against the one it
                   replaces (SPS-Conv's pruned detector against SECOND)

A recipe is a function of the method, its seeds and its kind's units, so `mutual` (peers that teach
each other every step) or `federated` (clients and an aggregating server) would be one more function
here and one more role list, with the flow unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

Unit = Optional[int]
UnitKey = tuple[str, int, Unit]   # (role, seed, unit) of a trained unit


@dataclass(frozen=True)
class Job:
    role: str
    seed: int
    unit: Unit
    teacher: UnitKey | None = None   # the trained teacher unit a distilled student learns from

    @property
    def key(self) -> UnitKey:
        return (self.role, self.seed, self.unit)


@dataclass(frozen=True)
class Composition:
    role: str
    seed: int
    members: tuple[UnitKey, ...]     # the trained units that make up the evaluated model


@dataclass(frozen=True)
class Plan:
    teachers: tuple[Job, ...]                  # trained first
    teacher_models: tuple[Composition, ...]    # the best teacher (validation) is registered next
    students: tuple[Job, ...]                  # trained after, so their runs can name its version
    student_models: tuple[Composition, ...]

    @property
    def jobs(self) -> tuple[Job, ...]:
        return self.teachers + self.students

    @property
    def models(self) -> tuple[Composition, ...]:
        return self.teacher_models + self.student_models


UnitsOf = Callable[[str], list[Unit]]
Derived = list[tuple[str, str, tuple[Unit, ...]]]  # (role, source role, units): e.g. ("iterated_1h", "teacher", (1,))


def _compose(role: str, seed: int, source: str, units: list[Unit] | tuple[Unit, ...]) -> Composition:
    return Composition(role, seed, tuple((source, seed, u) for u in units))


def _teachers(seeds: list[int], units: UnitsOf, derived: Derived) -> tuple[list[Job], list[Composition]]:
    jobs = [Job("teacher", s, u) for s in seeds for u in units("teacher")]
    models = []
    for s in seeds:
        models.append(_compose("teacher", s, "teacher", units("teacher")))
        for role, source, subset in derived:
            missing = set(subset) - set(units(source))
            if missing:
                raise ValueError(f"{role} needs {source} units {sorted(missing)}, which are not trained")
            models.append(_compose(role, s, source, subset))
    return jobs, models


def teacher_only(spec: Any, seeds: list[int], units: UnitsOf, derived: Derived) -> Plan:
    jobs, models = _teachers(seeds, units, derived)
    return Plan(tuple(jobs), tuple(models), (), ())


def distill(spec: Any, seeds: list[int], units: UnitsOf, derived: Derived) -> Plan:
    first = seeds[0]
    jobs, models = _teachers([first], units, derived)
    students: list[Job] = []
    for s in seeds:
        students += [Job("student_kd", s, u, teacher=("teacher", first, u)) for u in units("student_kd")]
    for role in ("student_labels",):
        students += [Job(role, s, u) for s in seeds for u in units(role)]
    missing = {j.teacher for j in students if j.teacher} - {j.key for j in jobs}
    if missing:
        raise ValueError(f"students would learn from untrained teacher units {sorted(missing, key=str)}")
    student_models = [_compose(role, s, role, units(role)) for role in ("student_kd", "student_labels")
                      for s in seeds]
    return Plan(tuple(jobs), tuple(models), tuple(students), tuple(student_models))


def compare(spec: Any, seeds: list[int], units: UnitsOf, derived: Derived) -> Plan:
    jobs, models = _teachers(seeds, units, derived)
    students = [Job("student_labels", s, u) for s in seeds for u in units("student_labels")]
    return Plan(tuple(jobs), tuple(models), tuple(students),
                tuple(_compose("student_labels", s, "student_labels", units("student_labels")) for s in seeds))


RECIPES: dict[str, Callable[..., Plan]] = {"distill": distill, "teacher_only": teacher_only, "compare": compare}
# the role each recipe's method exists to produce: registered under the method's name
PRODUCT_ROLE = {"distill": "student_kd", "teacher_only": "teacher", "compare": "student_labels"}


def plan(spec: Any, seeds: list[int], units: UnitsOf, derived: Derived = ()) -> Plan:
    """The jobs and compositions of `spec.recipe` for `seeds`; `units(role)` is the kind's units."""
    if not seeds:
        raise ValueError("a plan needs at least one seed")
    return RECIPES[spec.recipe](spec, list(seeds), units, list(derived))


def registered_names(spec: Any) -> dict[str, str]:
    """The method's product (its recipe's product role: a distilled student, or a cheaper model a
    `compare` method checks) is registered under the method's name, with the teacher beside it; a
    method whose product is its teacher (e.g. a forecaster checked against baselines) registers the
    teacher under its name."""
    if spec.product_role == "teacher":
        return {"teacher": spec.name}
    return {spec.product_role: spec.name, "teacher": f"{spec.name}_teacher"}
