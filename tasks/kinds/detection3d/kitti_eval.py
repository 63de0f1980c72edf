"""KITTI 3D detection metric: average precision over 40 recall positions (AP_R40), in bird's-eye view and
in 3D, as the KITTI devkit's Python port in OpenPCDet (`kitti_object_eval_python/eval.py`) computes it.

    average_precision(dets, truths, cls, iou="bev"|"3d")   one class: AP, the precision series, n_gt
    evaluate(dets, truths)     flat metrics: car_bev_ap, car_3d_ap, ..., mAP_bev, mAP_3d (all in 0..1)
    ap_curves(dets, truths)    per class and IoU kind, the arrays behind a precision/recall figure

The protocol, for one class and one IoU kind (`dets[i]` and `truths[i]` are the same frame):

1.  Per frame the ground truths of the class are *valid*; those of a similar class (`SIMILAR`: a Van for
    Car, a Person_sitting for Pedestrian) are *ignored*: a detection they take is neither a true nor a
    false positive. Ground truths of other classes take no part, nor do detections of other classes.
2.  Collecting scores: ground truths (valid and ignored, in the frame's order) each take, among the
    detections not taken yet whose IoU with them is strictly above the class threshold (0.7 for Car, 0.5
    otherwise), the one with the highest score. The scores taken by valid ground truths are the true
    positives' scores; n_gt counts the valid ground truths of all frames.
3.  Score thresholds: walking the true-positive scores from the highest, with i + 1 of them the recall is
    (i + 1) / n_gt. The walk aims at the recall positions 0, 1/40, 2/40, ... in turn: it stops at a score
    unless the next score's recall is strictly nearer to the position aimed at, takes that score as a
    threshold and aims at the next position; the last score is always taken. Each true positive serves
    at most one position, so there are at most min(41, number of true positives) thresholds.
4.  Counting, at each threshold: per frame, the detections scoring at least the threshold are matched
    again, ground truths in order, each taking the free detection above the IoU threshold with the
    *highest IoU* (not the highest score: this is what the devkit's counting pass does). A valid ground
    truth that takes one is a TP, one that takes none an FN; the detections left over are FPs.
    precision = TP / (TP + FP), recall = TP / n_gt.
5.  The precision at each of the 41 slots becomes the best precision at that slot or any later one
    (slots without a threshold hold 0), and AP_R40 = sum of slots 1..40 / 40: slot 0, the recall-0
    position, is left out, as `get_mAP_R40` does.

Consequences of (3) and (5) worth knowing: with fewer true positives than 41 the series is short, so a
small evaluation set scores below 1 even when perfect (one perfect detection of one object: AP 0; 40 of
40: 0.975; from 41 on: 1.0). This is the devkit's behaviour, kept so numbers compare with published ones.

Differences from the devkit, all forced by our data:
  - Difficulties are pooled. The devkit reports easy/moderate/hard, filtering ground truths by 2D box
    height, occlusion and truncation and detections by 2D height; our voxel files carry no 2D boxes or
    occlusion, so every ground truth of the class is valid and every detection of the class counts.
  - DontCare regions only matter to the devkit's 2D metric, not to BEV or 3D, so they play no part.
  - Boxes are in the LiDAR frame (the devkit works in the camera frame); IoU does not depend on the
    frame. IoUs are computed in float64 (the devkit's rotated IoU is float32), which can only matter for
    a pair within float32 rounding of the threshold.
  - Values are fractions in 0..1, not percentages; a threshold where TP + FP = 0 (which the devkit would
    turn into NaN) gets precision 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tasks.kinds.detection3d.boxes import bev_iou, iou_3d

__all__ = ["CLASSES", "IOU_THRESHOLDS", "SIMILAR", "FrameDetections", "FrameTruth", "average_precision",
           "evaluate", "ap_curves"]

CLASSES = ("Car", "Pedestrian", "Cyclist")
IOU_THRESHOLDS = {"Car": 0.7, "Pedestrian": 0.5, "Cyclist": 0.5}
SIMILAR = {"Car": ("Van",), "Pedestrian": ("Person_sitting",), "Cyclist": ()}  # devkit: neither TP nor FP
IOU_KINDS = ("bev", "3d")

_PAIR_CHUNK = 1 << 16   # box pairs per IoU call: bounds the clipping buffers' memory


@dataclass
class FrameDetections:
    """One frame's detections."""
    boxes: np.ndarray   # (D, 7) x, y, z (centre), dx, dy, dz, heading; LiDAR frame
    scores: np.ndarray  # (D,)
    names: list[str]    # class per detection


@dataclass
class FrameTruth:
    """One frame's ground truth."""
    boxes: np.ndarray   # (G, 7)
    names: list[str]


@dataclass
class _ClassFrame:
    """One frame seen by one class: its detections of the class, and the ground truths that take part."""
    det_boxes: np.ndarray   # (D, 7) float64
    scores: np.ndarray      # (D,) float64
    gt_boxes: np.ndarray    # (G, 7) float64, valid and ignored ones in the frame's order
    gt_valid: np.ndarray    # (G,) bool: True for the class itself, False for a similar class


# --- inputs --------------------------------------------------------------------------------------------

def _as_boxes(boxes) -> np.ndarray:
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 7)


def _check_frames(dets: list[FrameDetections], truths: list[FrameTruth]) -> None:
    if len(dets) == 0 or len(truths) == 0:
        raise ValueError("no frames to evaluate")
    if len(dets) != len(truths):
        raise ValueError(f"{len(dets)} detection frames but {len(truths)} ground-truth frames")
    for i, (d, t) in enumerate(zip(dets, truths)):
        n_det = len(_as_boxes(d.boxes))
        if not n_det == len(np.ravel(d.scores)) == len(d.names):
            raise ValueError(f"frame {i}: detections have mismatched boxes, scores and names")
        if len(_as_boxes(t.boxes)) != len(t.names):
            raise ValueError(f"frame {i}: ground truth has mismatched boxes and names")


def _class_frame(det: FrameDetections, truth: FrameTruth, cls: str) -> _ClassFrame:
    # names compare case-insensitively, as the devkit lower-cases them
    target = cls.lower()
    similar = {s.lower() for s in SIMILAR.get(cls, ())}
    det_mask = np.array([n.lower() == target for n in det.names], dtype=bool)
    gt_names = [n.lower() for n in truth.names]
    gt_mask = np.array([n == target or n in similar for n in gt_names], dtype=bool)
    gt_valid = np.array([n == target for n in gt_names], dtype=bool)
    return _ClassFrame(det_boxes=_as_boxes(det.boxes)[det_mask],
                       scores=np.asarray(det.scores, dtype=np.float64).ravel()[det_mask],
                       gt_boxes=_as_boxes(truth.boxes)[gt_mask],
                       gt_valid=gt_valid[gt_mask])


# --- overlaps ------------------------------------------------------------------------------------------

def _overlaps(frames: list[_ClassFrame], kind: str) -> list[np.ndarray]:
    """Per frame the (D, G) IoU matrix. All frames' pairs go through the IoU in a few batched calls rather
    than one call per frame, which on thousands of small frames is dominated by call overhead."""
    iou_fn = {"bev": bev_iou, "3d": iou_3d}[kind]
    shapes = [(len(f.det_boxes), len(f.gt_boxes)) for f in frames]
    firsts = [np.repeat(f.det_boxes, len(f.gt_boxes), 0) for f in frames]    # det i paired with every gt
    seconds = [np.tile(f.gt_boxes, (len(f.det_boxes), 1)) for f in frames]
    a, b = np.concatenate(firsts), np.concatenate(seconds)
    flat = np.concatenate([np.zeros(0)] + [
        iou_fn(torch.from_numpy(a[s:s + _PAIR_CHUNK]), torch.from_numpy(b[s:s + _PAIR_CHUNK]),
               aligned=True).numpy()
        for s in range(0, len(a), _PAIR_CHUNK)])
    out, start = [], 0
    for d, g in shapes:
        out.append(flat[start:start + d * g].reshape(d, g))
        start += d * g
    return out


# --- matching ------------------------------------------------------------------------------------------

def _best(candidates: np.ndarray, key: np.ndarray) -> int:
    """Index of the candidate with the largest key; on a tie the earliest, as the devkit's strict `>`
    scan over detections keeps the first one it met."""
    idx = np.flatnonzero(candidates)
    return int(idx[np.argmax(key[idx])])


def _true_positive_scores(frame: _ClassFrame, hit: np.ndarray) -> list[float]:
    """Collecting pass (step 2): each ground truth in order takes the highest-scoring free detection."""
    taken = np.zeros(len(frame.scores), dtype=bool)
    scores = []
    for g in range(len(frame.gt_boxes)):
        free = hit[:, g] & ~taken
        if not free.any():
            continue
        j = _best(free, frame.scores)
        taken[j] = True
        if frame.gt_valid[g]:   # taken by a similar class: used up, but no TP
            scores.append(frame.scores[j])
    return scores


def _count(frame: _ClassFrame, iou: np.ndarray, hit: np.ndarray, considered: np.ndarray) -> tuple[int, int]:
    """Counting pass (step 4) over the considered detections: (TP, FP). Each ground truth in order takes
    the free detection with the highest IoU."""
    taken = np.zeros(len(frame.scores), dtype=bool)
    tp = 0
    for g in range(len(frame.gt_boxes)):
        free = hit[:, g] & considered & ~taken
        if not free.any():
            continue
        taken[_best(free, iou[:, g])] = True
        tp += int(frame.gt_valid[g])
    # detections taken by an ignored ground truth are not FPs
    return tp, int((considered & ~taken).sum())


def _counts_at(frame: _ClassFrame, iou: np.ndarray, hit: np.ndarray,
               thresholds: np.ndarray) -> np.ndarray:
    """(T, 2) TP and FP of one frame at each score threshold."""
    out = np.zeros((len(thresholds), 2), dtype=np.int64)
    if len(frame.scores) == 0:
        return out
    # the considered set only grows as the threshold falls, so it is fixed by its size: match once per size
    sizes = (frame.scores[None, :] >= thresholds[:, None]).sum(1)
    if not hit.any():   # nothing can match: every considered detection is an FP
        out[:, 1] = sizes
        return out
    by_size: dict[int, tuple[int, int]] = {}
    for t, threshold in enumerate(thresholds):
        if sizes[t] not in by_size:
            by_size[sizes[t]] = _count(frame, iou, hit, frame.scores >= threshold)
        out[t] = by_size[sizes[t]]
    return out


# --- the curve -----------------------------------------------------------------------------------------

def _score_thresholds(tp_scores: np.ndarray, n_gt: int, recall_points: int) -> np.ndarray:
    """Step 3: the score thresholds for the recall positions 0, 1/N, ..., 1 (N = recall_points)."""
    scores = np.sort(tp_scores)[::-1]
    picked = []
    aim = 0.0   # accumulated by repeated addition, as the devkit does, so ties at midpoints break alike
    for i, score in enumerate(scores):
        last = i == len(scores) - 1
        recall_here, recall_next = (i + 1) / n_gt, (i + 2) / n_gt
        if not last and (recall_next - aim) < (aim - recall_here):
            continue   # the next score's recall is strictly nearer to the position aimed at
        picked.append(score)
        aim += 1.0 / recall_points
    return np.asarray(picked[:recall_points + 1], dtype=np.float64)


def _suffix_max(x: np.ndarray) -> np.ndarray:
    """x[i] -> max(x[i:]): the interpolation that makes precision non-increasing in recall."""
    return np.maximum.accumulate(x[::-1])[::-1]


def average_precision(dets: list[FrameDetections], truths: list[FrameTruth], cls: str, iou: str = "bev",
                      threshold: float | None = None, recall_points: int = 40) -> dict:
    """AP_R40 of one class (see the module docstring). Returns
        ap          float in 0..1 (NaN when the class has no ground truth)
        precision   (recall_points,) interpolated precision at the recall positions 1/N .. 1 (slots 1..N)
        recall      (recall_points,) the recall actually reached at the same slots' score thresholds
                    (0 where no threshold fell); the devkit's own recall array is max-interpolated too,
                    which makes it one constant, useless to plot, so it is returned raw
        score_thresholds  the score thresholds of slots 0..N that exist
        n_gt        number of valid ground truths
    `threshold` overrides the class's IoU threshold (a match needs IoU strictly above it)."""
    if iou not in IOU_KINDS:
        raise ValueError(f"iou must be one of {IOU_KINDS}, not {iou!r}")
    _check_frames(dets, truths)
    if threshold is None and cls not in IOU_THRESHOLDS:
        raise ValueError(f"no IoU threshold known for {cls!r}: pass threshold=")
    iou_threshold = IOU_THRESHOLDS[cls] if threshold is None else float(threshold)
    frames = [_class_frame(d, t, cls) for d, t in zip(dets, truths)]
    n_gt = int(sum(f.gt_valid.sum() for f in frames))
    slots = recall_points + 1   # slot 0 is the recall-0 position
    precision, recall = np.zeros(slots), np.zeros(slots)
    if n_gt == 0:
        return {"ap": float("nan"), "precision": precision[1:], "recall": recall[1:],
                "score_thresholds": np.zeros(0), "n_gt": 0}

    overlaps = _overlaps(frames, iou)
    hits = [o > iou_threshold for o in overlaps]   # strictly above, as the devkit
    tp_scores = np.asarray([s for f, h in zip(frames, hits) for s in _true_positive_scores(f, h)])
    thresholds = _score_thresholds(tp_scores, n_gt, recall_points)
    counts = sum((_counts_at(f, o, h, thresholds) for f, o, h in zip(frames, overlaps, hits)),
                 np.zeros((len(thresholds), 2), dtype=np.int64))
    tp, fp = counts[:, 0].astype(np.float64), counts[:, 1].astype(np.float64)
    n = len(thresholds)
    precision[:n] = np.divide(tp, tp + fp, out=np.zeros(n), where=(tp + fp) > 0)
    recall[:n] = tp / n_gt
    precision = _suffix_max(precision)
    return {"ap": float(precision[1:].sum() / recall_points), "precision": precision[1:],
            "recall": recall[1:], "score_thresholds": thresholds, "n_gt": n_gt}


def _classes_with_truth(truths: list[FrameTruth], classes) -> list[str]:
    present = {n.lower() for t in truths for n in t.names}
    return [c for c in classes if c.lower() in present]


def ap_curves(dets: list[FrameDetections], truths: list[FrameTruth], classes=CLASSES,
              recall_points: int = 40) -> dict[str, dict]:
    """{class: {"bev": average_precision(...), "3d": ...}} for each class with ground truth."""
    _check_frames(dets, truths)
    return {cls: {kind: average_precision(dets, truths, cls, kind, recall_points=recall_points)
                  for kind in IOU_KINDS}
            for cls in _classes_with_truth(truths, classes)}


def evaluate(dets: list[FrameDetections], truths: list[FrameTruth], classes=CLASSES,
             recall_points: int = 40) -> dict[str, float]:
    """Flat metrics in 0..1: "<class>_bev_ap" and "<class>_3d_ap" (class lower-cased) for each class with
    ground truth, and "mAP_bev", "mAP_3d", their means over those classes. A class without ground truth
    has no AP (it is left out, not counted as 0); with none at all, only the means are returned, as NaN."""
    curves = ap_curves(dets, truths, classes, recall_points)
    metrics: dict[str, float] = {}
    for kind in IOU_KINDS:
        for cls, by_kind in curves.items():
            metrics[f"{cls.lower()}_{kind}_ap"] = by_kind[kind]["ap"]
        aps = [by_kind[kind]["ap"] for by_kind in curves.values()]
        metrics[f"mAP_{kind}"] = float(np.mean(aps)) if aps else float("nan")
    return metrics
