"""Liu et al. 2022, "Spatial Pruned Sparse Convolution for Efficient 3D Object Detection" (NeurIPS):
SPSS-Conv and SPRS-Conv replace a sparse backbone's submanifold and strided convs; a site's feature
magnitude decides whether it is computed (SPSS) or dilated (SPRS), with nothing learned.

Recipe `compare`: per seed the unpruned detector (the teacher role, SECOND, shared with the `second`
method's trainings) and the pruned one on targets alone (`student_labels`), at the same budget. The
paper's claim, at keep ratio 0.5: the backbone's counted FLOPs fall by at least 40% and its CPU
latency by at least 30%, with car BEV AP within 2 points of the unpruned detector."""
import models.detection3d  # noqa: F401  (registers its models and loss terms)
from . import MethodSpec, register_method

register_method(MethodSpec(
    name="sps_conv",
    description="The SECOND-style detector with SPS-Conv in its backbone (keep ratio 0.5): spatially "
                "pruned submanifold and regular sparse convs, importance = feature magnitude.",
    kind="detection3d", data_stage="voxelize", recipe="compare", teacher="second_det", student="sps_det",
    loss={}, primary_metric="mAP_bev", higher_is_better=True, baselines=("student_labels",),
    claim=("student_labels.backbone_gflops <= 0.6 * teacher.backbone_gflops",
           "student_labels.latency_ms <= 0.7 * teacher.latency_ms",
           "student_labels.car_bev_ap >= teacher.car_bev_ap - 0.02"),
))
