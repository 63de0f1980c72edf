"""Zhou et al. 2023, "Distilling Vision-Language Pre-training to Collaborate with Weakly-Supervised
Temporal Action Localization" (CVPR): a dual-branch localizer (CBP + VLP) whose branches learn from
each other's confident pseudo-labels, background from CBP (B step), foreground from VLP (F step).

Here the pseudo-labels come from a frozen teacher `wtal_dual` trained on labels alone, not from the
other branch of the model in training (models/localization.py, `AlternatingBFDistillation`). The
labels-only student is the same dual model on `mil` alone: its branches are the single-branch
baselines at the same budget and seeds, and its fused output is dual-branch fusion without the
distillation."""
import models.localization  # noqa: F401  (registers its models and loss terms)
from . import MethodSpec, register_method

register_method(MethodSpec(
    name="wtal_dcc",
    description="Dual-branch WTAL: a CBP and a VLP MIL branch, the student distilled with alternating "
                "background (from the teacher's CBP branch) and foreground (from its VLP branch) "
                "pseudo-labels.",
    kind="localization", data_stage="video_features", teacher="wtal_dual", student="wtal_dual",
    loss={"mil": {"weight": 1.0},
          "wtal_bf": {"weight": 1.0, "bg_threshold": 0.2, "fg_threshold": 0.8}},
    primary_metric="mAP", higher_is_better=True, baselines=("student_labels",),
    # the fused distilled student against each single branch (the paper's claim), and against the
    # fused labels-only dual model (so that fusion alone cannot make the claim hold)
    claim=("student_kd.mAP > student_labels.cbp_mAP", "student_kd.mAP > student_labels.vlp_mAP",
           "student_kd.mAP > student_labels.mAP"),
))
