"""The 3D detection kind: LiDAR voxels -> rotated boxes for car, pedestrian and cyclist.

Data: a `voxelize` stage folder (schema.py), split as the scans stage listed its frames (and the real
KITTI frames the stage may add, split `real`, scored like the test split as `real_*`). A role trains
one detector (unit None) on CenterPoint targets encoded from the frames' boxes. It is scored on the
test split by KITTI-protocol BEV and 3D AP (R40; kitti_eval.py), plus car BEV AP at IoU 0.5
(`car_bev_ap50`: it tells a detector that finds cars from one whose boxes are tight), and by what its
backbone costs: counted FLOPs (`backbone_gflops`, per frame) and measured CPU latency (`latency_ms`, the median
over test frames, one frame at a time), with the same layers run as dense conv3d on the whole grid
(`dense_latency_ms`) for an unpruned model. No non-learned baselines.
"""
from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import models.detection3d  # noqa: F401  (registers its models and the `centerpoint` / `heatmap_kd` terms)
from models import create_model
from models.detection3d import (CLASS_NAMES, BEVGrid, VoxelDetector, backbone_flops, decode, dense_backbone,
                                encode_targets)

from .. import Unit, register_kind
from ..base import BatchedDataset
from .boxes import nms_bev
from .kitti_eval import FrameDetections, FrameTruth, average_precision, evaluate
from .schema import VoxelFrame, load_voxels

NMS_IOU = 0.1        # BEV IoU above which a lower-scored box of the same class is a duplicate
LATENCY_FRAMES = 8   # test frames timed per model (after one warm-up)
DENSE_FRAMES = 1     # the dense run costs ~1 s a frame: once is enough to compare


@dataclass
class Split:
    frames: list[VoxelFrame]
    heatmap: torch.Tensor   # (N, classes, H, W)
    reg: torch.Tensor       # (N, 8, H, W)
    mask: torch.Tensor      # (N, H, W)

    def __len__(self) -> int:
        return len(self.frames)


@dataclass
class DetectionData:
    grid: dict[str, Any]            # the voxel grid (summary.json)
    bev: BEVGrid
    splits: dict[str, Split]

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(self.grid["shape_zyx"])


def encode_split(frames: list[VoxelFrame], bev: BEVGrid) -> Split:
    maps = []
    for f in frames:
        known = [i for i, n in enumerate(f.names) if n in CLASS_NAMES]
        boxes = torch.from_numpy(f.boxes[known]).float()
        labels = torch.tensor([CLASS_NAMES.index(f.names[i]) for i in known], dtype=torch.long)
        maps.append(encode_targets(boxes, labels, bev, len(CLASS_NAMES)))
    h, w = bev.cells
    empty = (torch.zeros(0, len(CLASS_NAMES), h, w), torch.zeros(0, 8, h, w), torch.zeros(0, h, w))
    stacked = [torch.stack(m) for m in zip(*maps)] if maps else list(empty)
    return Split(frames, *stacked)


def load_detection(data_dir: str, validate: bool = False) -> DetectionData:
    summary, frames = load_voxels(data_dir, validate=validate)
    grid = summary["grid"]
    bev = BEVGrid.of(grid["point_range"], grid["voxel_size"], tuple(grid["shape_zyx"]))
    by_split: dict[str, list[VoxelFrame]] = {"train": [], "val": [], "test": []}
    for f in frames:
        by_split.setdefault(summary["frames"][f.frame].get("split") or "test", []).append(f)
    return DetectionData(grid, bev, {name: encode_split(fs, bev) for name, fs in by_split.items()})


def batch_inputs(frames: list[VoxelFrame]) -> dict[str, Any]:
    """Frames' voxels as one batch: features (N, C), coords (N, 4) batch z y x, batch_size."""
    coords = [torch.cat([torch.full((len(f.coords), 1), i, dtype=torch.int32), torch.from_numpy(f.coords)], 1)
              for i, f in enumerate(frames)]
    return {"features": torch.from_numpy(np.concatenate([f.features for f in frames])).float(),
            "coords": torch.cat(coords).long(), "batch_size": len(frames)}


class FrameSet(BatchedDataset):
    """(voxels of the frames, {"heatmap", "reg", "mask"} targets, index) for a batch of frames."""

    def __init__(self, split: Split) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitems__(self, index: torch.Tensor) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor]:
        index = torch.as_tensor(index)
        s = self.split
        targets = {"heatmap": s.heatmap[index], "reg": s.reg[index], "mask": s.mask[index]}
        return batch_inputs([s.frames[i] for i in index.tolist()]), targets, index


@torch.no_grad()
def detect(model: nn.Module, frames: list[VoxelFrame], bev: BEVGrid, batch_size: int = 8) -> list[FrameDetections]:
    """Boxes, scores and class names per frame after per-class rotated NMS."""
    model.eval()
    out = []
    for start in range(0, len(frames), batch_size):
        pred = model(batch_inputs(frames[start:start + batch_size]))
        for boxes, scores, cls in decode(pred["heatmap"], pred["reg"], bev):
            keep = torch.cat([torch.nonzero(cls == c).flatten()[nms_bev(boxes[cls == c].double(), scores[cls == c],
                                                                        NMS_IOU)] for c in cls.unique()]) \
                if len(cls) else torch.zeros(0, dtype=torch.long)
            out.append(FrameDetections(boxes[keep].double().numpy(), scores[keep].numpy(),
                                       [CLASS_NAMES[int(c)] for c in cls[keep]]))
    return out


def truths(frames: list[VoxelFrame]) -> list[FrameTruth]:
    return [FrameTruth(f.boxes, list(f.names)) for f in frames]


def _median_ms(fn, inputs: list[Any]) -> float:
    fn(inputs[0])  # warm-up: first-call allocations and lazy init
    times = []
    for x in inputs:
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.no_grad()
def backbone_cost(model: VoxelDetector, frames: list[VoxelFrame], dense: bool) -> dict[str, float]:
    """Counted FLOPs of the sparse backbone (mean per frame) and its median CPU latency, one frame at
    a time; with `dense`, the latency of the same layers as dense conv3d on the whole grid."""
    model.eval()
    voxels = [model.voxels(batch_inputs([f])) for f in frames]
    flops = []
    for x in voxels:
        model.backbone(x)
        flops.append(backbone_flops(model))
    timed = voxels[:LATENCY_FRAMES + 1]
    cost = {"backbone_gflops": float(np.mean(flops)) / 1e9, "latency_ms": _median_ms(model.backbone, timed)}
    if dense:
        cost["dense_latency_ms"] = _median_ms(lambda x: dense_backbone(model, x), voxels[:DENSE_FRAMES + 1])
    return cost


class Predictor:
    """What scoring calls: the model's detections on frames, and its backbone's cost."""

    def __init__(self, model: VoxelDetector, data: DetectionData) -> None:
        self.model, self.data = model, data

    def __call__(self, frames: list[VoxelFrame]) -> list[FrameDetections]:
        return detect(self.model, frames, self.data.bev)

    def cost(self, frames: list[VoxelFrame]) -> dict[str, float]:
        return backbone_cost(self.model, frames, dense=self.model.cfg.keep_ratio is None)


class Detection3D:
    cadence = "nightly"
    name = "detection3d"
    labels_loss = {"centerpoint": {"weight": 1.0}}
    cache_batch = 8        # frames per teacher pass when caching its outputs
    val_key = "val_mAP_bev"
    val_higher_is_better = True
    composes = False

    def load(self, data_dir: str, validate: bool = False) -> DetectionData:
        return load_detection(data_dir, validate=validate)

    def units(self, spec: Any, role: str) -> list[Unit]:
        return [None]

    def compositions(self, spec: Any) -> list[tuple[str, str, tuple[Unit, ...]]]:
        return []

    def train_set(self, data: DetectionData, unit: Unit) -> FrameSet:
        return FrameSet(data.splits["train"])

    def build(self, spec: Any, side: str, data: DetectionData, tp: Any) -> nn.Module:
        name = spec.teacher if side == "teacher" else spec.student
        return create_model(name, shape_zyx=data.shape_zyx, **tp.model)

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        return model(inputs)

    def validate(self, model: nn.Module, data: DetectionData, unit: Unit, device: torch.device) -> dict[str, float]:
        val = data.splits["val"]
        scores = evaluate(detect(model, val.frames, data.bev), truths(val.frames))
        return {"val_mAP_bev": scores.get("mAP_bev", 0.0)}

    def predictor(self, model: nn.Module, data: DetectionData) -> Predictor:
        return Predictor(model, data)

    def baselines(self, spec: Any, data: DetectionData) -> dict[str, Any]:
        return {}

    def test_metrics(self, predict: Predictor, data: DetectionData, mp: Any) -> dict[str, float]:
        """AP and backbone cost on the test split; AP on the real frames too (`real_*`), when the
        voxelize stage added them (its `real_frames`)."""
        test = data.splits["test"].frames
        detections, truth = predict(test), truths(test)
        metrics = {**evaluate(detections, truth), **predict.cost(test)}
        if any("Car" in t.names for t in truth):   # KITTI's easier car threshold, to see boxes found but loose
            metrics["car_bev_ap50"] = average_precision(detections, truth, "Car", "bev", threshold=0.5)["ap"]
        real = data.splits.get("real")
        if real is not None and len(real):
            metrics.update({f"real_{k}": v for k, v in evaluate(predict(real.frames), truths(real.frames)).items()})
        return metrics

    def input_example(self, data: DetectionData) -> None:
        return None  # a detector takes a dict of voxels; MLflow's signature cannot say so

    def unit_name(self, unit: Unit) -> str:
        return ""

    def score_chart(self, metric: str) -> tuple[str, Any] | None:
        """The DVC plot a test score belongs on: car_bev_ap -> ("bev_ap_by_class", "car")."""
        m = re.fullmatch(r"(real_)?([a-z]+)_(bev|3d)_ap", metric)
        return (f"{m[1] or ''}{m[3]}_ap_by_class", m[2]) if m else None

    def known_roles(self) -> set[str]:
        return set()

    def check_params(self, spec: Any, mp: Any) -> str | None:
        """A detector's `model` kwargs (`teacher.model`, `student.model`) build, or `key: problem`:
        checked before anything starts, not when the first training builds its model."""
        for side, tp, name in (("teacher", mp.teacher, spec.teacher), ("student", mp.student, spec.student)):
            if tp is None or name is None:
                continue
            try:
                create_model(name, **tp.model)
            except (TypeError, ValueError) as e:
                return f"{side}.model: {e}"
        return None

    def report_figures(self, evaluations: list[dict[str, Any]], data: DetectionData, teacher: nn.Module,
                       mp: Any, product: nn.Module | None = None) -> dict[str, Any]:
        """A test frame in bird's-eye view with the teacher's (and the product's) boxes against the
        truth; the sites each pruned conv of the product kept; the teacher's precision-recall curves."""
        from .figures import bev_figure, pr_figure, pruning_figure
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        test = data.splits["test"].frames
        if not test:
            return {}
        shown = {"teacher": teacher, **({"product": product} if product is not None else {})}
        figures = {"bev_boxes.png": bev_figure(plt, test[0], {r: detect(m, test[:1], data.bev)[0]
                                                              for r, m in shown.items()}, data.grid),
                   "pr_curves.png": pr_figure(plt, detect(teacher, test, data.bev), truths(test))}
        if product is not None and product.cfg.keep_ratio is not None:
            figures["pruning_mask.png"] = pruning_figure(plt, product, batch_inputs(test[:1]))
        return figures


register_kind(Detection3D())
