"""Wen et al. 2017, "TernGrad: Ternary Gradients to Reduce Communication in Distributed Deep
Learning": data-parallel workers exchange gradients stochastically rounded to {-1, 0, +1} x a shared
per-layer scale (after clipping at 2.5 std), 2 bits an element instead of 32.

Recipe `compare`: per seed the digits CNN trained with full-precision DDP all-reduce (the teacher
role) and the same CNN, same budget, with the TernGrad communication hook (`student_labels`); both
on 2 torchrun processes (gloo on CPU), set by `parallel:` in params.yaml. Claims: accuracy within 2
points of full precision, and at least 8x fewer bytes sent per optimizer step, as counted by the
hooks (tasks/train/comm_hooks.py)."""
import models.vision  # noqa: F401  (registers its models)
from . import MethodSpec, register_method

register_method(MethodSpec(
    name="terngrad",
    description="TernGrad (Wen et al. 2017): the digits CNN on 2 DDP ranks exchanging ternary "
                "gradients (2 bits each plus a float scale per layer) instead of float32 all-reduce.",
    kind="classification", data_stage="digits", recipe="compare", teacher="digits_cnn", student="digits_cnn",
    loss={}, primary_metric="accuracy", higher_is_better=True, baselines=("student_labels",),
    claim=("student_labels.accuracy >= teacher.accuracy - 0.02",
           "student_labels.comm_bytes_per_step <= 0.125 * teacher.comm_bytes_per_step"),
))
