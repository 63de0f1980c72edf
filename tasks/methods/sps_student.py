"""A slimmer SPS-Conv detector (half the widths, keep ratio 0.5) distilled from the SECOND teacher:
the heatmap and boxes where the teacher is confident (`heatmap_kd`) and a FitNets hint on the BEV
feature map (`hint`, through a learned 1×1 conv), with the labels' CenterPoint loss. Claim: it beats
the same slim detector trained on labels alone."""
import models.detection3d  # noqa: F401  (registers its models and loss terms)
from . import MethodSpec, register_method

register_method(MethodSpec(
    name="sps_student",
    description="A half-width SPS-Conv detector distilled from SECOND with heatmap/box KD and a BEV "
                "feature hint, on top of the CenterPoint loss.",
    kind="detection3d", data_stage="voxelize", teacher="second_det", student="sps_det_slim",
    loss={"centerpoint": {"weight": 1.0},
          "heatmap_kd": {"weight": 1.0, "threshold": 0.3},
          "hint": {"weight": 1.0, "student_key": "bev_net", "teacher_key": "bev_net"}},
    feature_taps={"teacher": ("bev_net",), "student": ("bev_net",)},
    primary_metric="mAP_bev", higher_is_better=True, baselines=("student_labels",),
    claim="student_kd.mAP_bev > student_labels.mAP_bev",
))
