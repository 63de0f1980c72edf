"""The detection kind's MLflow figures: boxes in bird's-eye view, the sites SPS-Conv keeps, PR curves."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn as nn

from models.detection3d import SPRSConv3d, SPSSConv3d

from .boxes import bev_corners
from .kitti_eval import CLASSES, FrameDetections, FrameTruth, ap_curves
from .schema import VoxelFrame

COLOURS = {"Car": "tab:blue", "Pedestrian": "tab:orange", "Cyclist": "tab:green"}


def _outline(ax: Any, boxes: np.ndarray, **style: Any) -> None:
    if len(boxes):
        for c in bev_corners(torch.as_tensor(boxes, dtype=torch.float64)).numpy():
            ax.plot(*np.vstack([c, c[:1]]).T, **style)


def bev_figure(plt: Any, frame: VoxelFrame, detections: dict[str, FrameDetections], grid: dict[str, Any]) -> Any:
    """The frame's voxels from above, true boxes in black, each model's boxes (score > 0.3) in colour."""
    lo, hi = grid["point_range"][:3], grid["point_range"][3:]
    fig, axes = plt.subplots(1, len(detections), figsize=(5.5 * len(detections), 5.5), squeeze=False)
    for ax, (role, det) in zip(axes[0], detections.items()):
        ax.scatter(frame.features[:, 0], frame.features[:, 1], s=0.2, c="0.6")
        _outline(ax, frame.boxes, color="k", lw=1.2)
        for name, colour in COLOURS.items():
            shown = np.array([n == name for n in det.names], dtype=bool) & (det.scores > 0.3)
            _outline(ax, det.boxes[shown], color=colour, lw=1.0, ls="--")
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_aspect("equal")
        ax.set_title(f"{frame.frame}: {role} (dashed, score > 0.3) vs truth (black)", fontsize=8)
        ax.set_xlabel("x (m)")
    axes[0, 0].set_ylabel("y (m)")
    fig.tight_layout()
    return fig


@torch.no_grad()
def pruning_figure(plt: Any, model: nn.Module, inputs: dict[str, Any]) -> Any:
    """For each SPS conv of the model, its input sites from above on one frame's `inputs` (the kind's
    batch of one): kept (computed or dilated) in colour, pruned in grey."""
    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.append(
                   (name, inp[0].coords, mod.last_keep)))
               for name, m in model.named_modules() if isinstance(m, (SPSSConv3d, SPRSConv3d))]
    model.eval()
    try:
        model(inputs)
    finally:
        for h in handles:
            h.remove()
    fig, axes = plt.subplots(1, max(1, len(seen)), figsize=(3.2 * max(1, len(seen)), 3.4), squeeze=False)
    for ax, (name, coords, keep) in zip(axes[0], seen):
        c, k = coords.numpy(), keep.numpy().astype(bool)
        ax.scatter(c[~k, 3], c[~k, 2], s=1, c="0.75", label="pruned")
        ax.scatter(c[k, 3], c[k, 2], s=1, c="tab:red", label="kept")
        ax.set_title(f"{name}: {k.mean():.0%} kept of {len(k)}", fontsize=7)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].legend(fontsize=6, markerscale=5, loc="upper right")
    fig.suptitle("SPS-Conv: sites kept by feature magnitude (x across, y up)", fontsize=9)
    fig.tight_layout()
    return fig


def pr_figure(plt: Any, detections: list[FrameDetections], truths: list[FrameTruth]) -> Any:
    """Interpolated precision at the 40 recall positions of AP R40, per class, BEV and 3D."""
    curves = ap_curves(detections, truths, CLASSES)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, iou in zip(axes, ("bev", "3d")):
        for cls in CLASSES:
            c = curves.get(cls, {}).get(iou)
            if c is not None:
                ax.plot(c["recall"], c["precision"], marker=".", color=COLOURS[cls], label=f"{cls} AP {c['ap']:.2f}")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("recall")
        ax.set_title(f"{iou.upper()} AP R40 (teacher, test split)", fontsize=9)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("precision")
    fig.tight_layout()
    return fig
