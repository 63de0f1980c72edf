"""Declaration helpers for localization methods (used by tasks/methods/wtal_*.py)."""
from __future__ import annotations

from ...methods import MethodSpec


def single_branch(name: str, description: str, teacher: str, over_complete: bool) -> MethodSpec:
    """One MIL localizer per seed (no student), scored by mAP; its claim is the WTAL paper's
    motivating observation about its segments: the predictions that find an action (matched at tIoU
    0.1) are longer (over-complete) or shorter (incomplete) than the actions they find."""
    return MethodSpec(
        name=name, description=description, kind="localization", data_stage="video_features",
        recipe="teacher_only", teacher=teacher, student=None, loss={},
        primary_metric="mAP", higher_is_better=True, baselines=(),
        claim=f"teacher.mean_pred_len {'>' if over_complete else '<'} teacher.mean_gt_len")
