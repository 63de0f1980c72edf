"""Hinton et al. 2015, "Distilling the knowledge in a neural network": logit KD on the digits."""
import models.vision  # noqa: F401  (registers its models)
from . import MethodSpec, register_method

register_method(MethodSpec(
    name="hinton_kd",
    description="Hinton et al. 2015: a tiny MLP learns from a CNN's temperature-softened logits.",
    kind="classification",
    data_stage="digits",
    teacher="digits_cnn",
    student="digits_mlp_tiny",
    loss={"kd": {"weight": 0.9, "temperature": 4.0}, "ce": {"weight": 0.1}},
    primary_metric="accuracy",
    higher_is_better=True,
    baselines=("student_labels",),
    claim="student_kd.accuracy > student_labels.accuracy",
))
