"""Declaration helpers for forecast methods (used by tasks/methods/pangu*.py)."""
from __future__ import annotations

from ...methods import MethodSpec

HEADLINE = ("z500", "t850", "t2m")  # WB2's headline variables; the default profile has all three


def beats_baselines(name: str, description: str, leads: tuple[int, ...], variables: tuple[str, ...]) -> MethodSpec:
    """A Pangu-lite, one teacher per seed, whose claim is lower RMSE than persistence and climatology
    for every variable and lead; the primary metric is the first variable at the longest lead."""
    baselines = ("persistence", "climatology")
    return MethodSpec(
        name=name, description=description, kind="forecast", data_stage="era5_prepare", recipe="teacher_only",
        teacher="pangu_lite", student=None, loss={}, leads=leads,
        primary_metric=f"rmse_{variables[0]}_{max(leads)}h", higher_is_better=False, baselines=baselines,
        claim=tuple(f"teacher.rmse_{v}_{lead}h < {b}.rmse_{v}_{lead}h"
                    for v in variables for lead in leads for b in baselines))
