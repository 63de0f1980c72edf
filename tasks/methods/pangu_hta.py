"""Pangu-Weather's hierarchical temporal aggregation against iterating the 1 h model."""
import models.weather  # noqa: F401  (registers its models)
from ..kinds.forecast.methods import HEADLINE
from . import MethodSpec, register_method

register_method(MethodSpec(
    name="pangu_hta",
    description="Hierarchical temporal aggregation: the greedy composition of 1/6/24 h models against "
                "iterating the 1 h model (24 steps to +24 h).",
    kind="forecast", data_stage="era5_prepare", recipe="teacher_only", teacher="pangu_lite", student=None,
    loss={}, leads=(1, 6, 24), primary_metric="rmse_z500_24h", higher_is_better=False,
    baselines=("iterated_1h",),
    claim=tuple(f"teacher.rmse_{v}_24h < iterated_1h.rmse_{v}_24h" for v in HEADLINE),
))
