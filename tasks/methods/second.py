"""Yan et al. 2018, "SECOND: Sparsely Embedded Convolutional Detection" (Sensors): a voxel detector
whose 3D middle layers are sparse (submanifold and strided regular) convolutions instead of
VoxelNet's dense 3D convolutions, here with a CenterPoint heatmap head. Its claim is SECOND's own:
the sparse backbone runs faster than the same layers as dense 3D convolutions on the whole grid.
It is the reference the SPS-Conv methods are measured against (they share its trained teachers)."""
import models.detection3d  # noqa: F401  (registers its models and loss terms)
from . import MethodSpec, register_method

register_method(MethodSpec(
    name="second",
    description="SECOND-style detector: sparse 3D backbone (submanifold + stride-2 sparse convs) -> BEV "
                "map -> CenterPoint heatmap and box head; claim: the sparse backbone is faster on CPU "
                "than the same layers run densely.",
    kind="detection3d", data_stage="voxelize", recipe="teacher_only", teacher="second_det", student=None,
    loss={}, primary_metric="mAP_bev", higher_is_better=True, baselines=(),
    claim="teacher.latency_ms < teacher.dense_latency_ms",
))
