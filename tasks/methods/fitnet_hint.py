"""Romero et al. 2015, "FitNets: hints for thin deep nets": a hint through a learned regressor + KD."""
import models.vision  # noqa: F401  (registers its models)
from . import MethodSpec, register_method

register_method(MethodSpec(
    name="fitnet_hint",
    description="Romero et al. 2015 (FitNets): the MLP's hidden layer regresses the CNN's pooled "
                "features through a learned adapter, on top of logit KD.",
    kind="classification",
    data_stage="digits",
    teacher="digits_cnn",
    student="digits_mlp_tiny",
    loss={"kd": {"weight": 0.9, "temperature": 4.0}, "ce": {"weight": 0.1},
          "hint": {"weight": 1.0, "student_key": "features", "teacher_key": "features"}},
    feature_taps={"student": ("features",), "teacher": ("features",)},
    primary_metric="accuracy",
    higher_is_better=True,
    baselines=("student_labels",),
    claim="student_kd.accuracy > student_labels.accuracy",
))
