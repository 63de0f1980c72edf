"""A third-size Pangu distilled from the teacher's forecasts and encoder features."""
import models.weather  # noqa: F401  (registers its models)
from ..kinds.forecast.methods import HEADLINE
from . import MethodSpec, register_method

register_method(MethodSpec(
    name="pangu_student",
    description="A third-size Pangu distilled from the teacher's 6 h forecasts (output KD) and its "
                "encoder features (hint through a learned adapter), against the same student on targets.",
    kind="forecast", data_stage="era5_prepare", teacher="pangu_lite", student="pangu_tiny",
    loss={"forecast_l1": {"weight": 0.5}, "forecast_kd": {"weight": 0.5},
          "hint": {"weight": 0.1, "student_key": "encoder1", "teacher_key": "encoder1"}},
    feature_taps={"student": ("encoder1",), "teacher": ("encoder1",)},
    leads=(6,), primary_metric="rmse_z500_6h", higher_is_better=False,
    baselines=("student_labels",),
    claim=tuple(f"student_kd.rmse_{v}_6h < student_labels.rmse_{v}_6h" for v in HEADLINE),
))
