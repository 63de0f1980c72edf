"""From snippet scores to scored segments, and THUMOS-protocol detection mAP.

Proposals (per video, per predicted class): the snippet score is the class probability times the
foreground attention. Every threshold of `THRESHOLDS` × the video's maximum score cuts it into runs
of consecutive snippets above it; each run is a segment from its first snippet's start to its last
snippet's end, scored by the outer-inner contrast of AutoLoc (Shou et al. 2018) as CO2-Net uses it:
the mean score inside minus the mean over a quarter of its length on each side, plus `GAMMA` × the
video-level class probability. Classes are those with a video probability of at least
`CLASS_THRESHOLD`, and the most probable class always. Duplicates are removed by hard NMS per video
and class (greedy by score: a segment is dropped when its tIoU with a kept one exceeds `NMS_TIOU`;
hard rather than soft NMS, so a dropped segment leaves the list instead of lingering with a decayed
score).

Detection AP follows ActivityNet's `Evaluation/eval_detection.py` (the THUMOS'14 protocol at tIoU
0.1:0.1:0.7): per class, predictions in descending score (ties in input order), each matched to the
unmatched ground truth of its class and video with the highest tIoU at or above the threshold (a true
positive), else a false positive; AP is the area under the precision envelope at the recall points
(VOC 2011 interpolation, as their `interpolated_prec_rec`). Classes without ground truth have no AP
and are left out of the mean; a class with ground truth and no predictions scores 0.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

import numpy as np
import pandas as pd

TIOU_THRESHOLDS = np.round(np.arange(0.1, 0.75, 0.1), 1)   # 0.1, 0.2, ..., 0.7
THRESHOLDS = np.round(np.arange(0.1, 0.95, 0.1), 1)        # proposal thresholds, × the video's max score
CLASS_THRESHOLD = 0.2
GAMMA = 0.2
NMS_TIOU = 0.5


@dataclass
class Detections:
    """Scored segments, one row each."""
    video: np.ndarray     # (P,) int: index of the video in its split
    label: np.ndarray     # (P,) int: class id
    segment: np.ndarray   # (P, 2) float: start, end (s)
    score: np.ndarray     # (P,) float

    def __len__(self) -> int:
        return len(self.score)

    @classmethod
    def concat(cls, parts: list["Detections"]) -> "Detections":
        if not parts:
            return cls(np.zeros(0, int), np.zeros(0, int), np.zeros((0, 2)), np.zeros(0))
        fields = ("video", "label", "segment", "score")
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in fields))

    def take(self, index: np.ndarray) -> "Detections":
        return Detections(self.video[index], self.label[index], self.segment[index], self.score[index])


# ---------------------------------------------------------------------------------------------------
# geometry

def segment_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """tIoU of every segment of `a` (P, 2) with every segment of `b` (G, 2): (P, G)."""
    a, b = np.asarray(a, float).reshape(-1, 2), np.asarray(b, float).reshape(-1, 2)
    inter = (np.minimum(a[:, None, 1], b[None, :, 1]) - np.maximum(a[:, None, 0], b[None, :, 0])).clip(0)
    union = (a[:, 1] - a[:, 0])[:, None] + (b[:, 1] - b[:, 0])[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def nms(segment: np.ndarray, score: np.ndarray, tiou: float = NMS_TIOU) -> np.ndarray:
    """Hard NMS: indices of the kept segments, best first."""
    order = np.argsort(-score, kind="stable")
    iou = segment_iou(segment[order], segment[order])
    alive = np.ones(len(order), bool)
    for i in range(len(order)):
        if alive[i]:
            alive[i + 1:] &= iou[i, i + 1:] <= tiou
    return order[alive]


# ---------------------------------------------------------------------------------------------------
# proposals

def runs(above: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start (inclusive) and end (exclusive) snippet of every run of True in each row of (R, T)."""
    edges = np.diff(np.pad(above.astype(np.int8), ((0, 0), (1, 1))), axis=1)  # (R, T + 1)
    return np.nonzero(edges == 1)[1], np.nonzero(edges == -1)[1]             # row-major: pairs align


def proposals(score: np.ndarray, times: np.ndarray, video_prob: float,
              thresholds: np.ndarray = THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
    """Segments (S, 2) in seconds and their scores (S,) from one class's snippet scores (T,) of one
    video (valid snippets only), `times` (T, 2) the snippets' start and end."""
    t = len(score)
    peak = score.max(initial=0.0)
    if t == 0 or peak <= 0:
        return np.zeros((0, 2)), np.zeros(0)
    start, end = runs(score[None, :] >= thresholds[:, None] * peak)
    start, end = np.unique(np.stack([start, end], 1), axis=0).T      # the same run from several thresholds
    csum = np.concatenate([[0.0], np.cumsum(score)])
    inner = (csum[end] - csum[start]) / (end - start)
    margin = np.maximum(1, np.round((end - start) / 4).astype(int))
    lo, hi = np.maximum(0, start - margin), np.minimum(t, end + margin)
    outer_n = (start - lo) + (hi - end)
    outer = np.divide(csum[start] - csum[lo] + csum[hi] - csum[end], outer_n,
                      out=np.zeros(len(start)), where=outer_n > 0)
    segment = np.stack([times[start, 0], times[end - 1, 1]], 1).astype(float)
    return segment, inner - outer + GAMMA * video_prob


def localize(cas_prob: np.ndarray, attn: np.ndarray, video_prob: np.ndarray, mask: np.ndarray,
             times: np.ndarray) -> Detections:
    """Detections of a split from its outputs: class probabilities (N, T, C), attention (N, T), video
    class probabilities (N, C), the valid-snippet mask (N, T) and snippet times (N, T, 2)."""
    parts = []
    for i in range(len(cas_prob)):
        valid = mask[i]
        classes = set(np.nonzero(video_prob[i] >= CLASS_THRESHOLD)[0]) | {int(video_prob[i].argmax())}
        for c in sorted(classes):
            score = cas_prob[i, valid, c] * attn[i, valid]
            seg, sc = proposals(score, times[i, valid], float(video_prob[i, c]))
            keep = nms(seg, sc)
            parts.append(Detections(np.full(len(keep), i), np.full(len(keep), c), seg[keep], sc[keep]))
    return Detections.concat(parts)


# ---------------------------------------------------------------------------------------------------
# matching and AP

def match(pred: Detections, gt_video: np.ndarray, gt_segment: np.ndarray,
          tiou_thresholds: np.ndarray = TIOU_THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
    """Greedy matching of one class's predictions to its ground truths, per tIoU threshold.

    Returns the prediction order (descending score, stable) and `matched` (n_thr, P) in that order:
    the index of the ground truth each prediction takes, or -1 (a false positive)."""
    order = np.argsort(-pred.score, kind="stable")
    n_thr, n_gt = len(tiou_thresholds), len(gt_video)
    matched = np.full((n_thr, len(order)), -1)
    if n_gt == 0 or len(order) == 0:
        return order, matched
    same_video = pred.video[order][:, None] == gt_video[None, :]
    iou = np.where(same_video, segment_iou(pred.segment[order], gt_segment), -1.0)  # (P, G)
    locked = np.zeros((n_thr, n_gt), bool)
    rows = np.arange(n_thr)
    for p in np.nonzero(iou.max(1) >= tiou_thresholds.min())[0]:
        ok = (iou[p][None, :] >= tiou_thresholds[:, None]) & ~locked   # (n_thr, G)
        best = np.where(ok, iou[p][None, :], -1.0).argmax(1)            # highest tIoU still free
        hit = ok[rows, best]
        matched[hit, p] = best[hit]
        locked[rows[hit], best[hit]] = True
    return order, matched


def interpolated_ap(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """VOC 2011 interpolated AP of each row of (n_thr, P) precision/recall curves: the area under
    the running maximum of precision from the right, at recall's steps (a flat step adds 0)."""
    n = len(precision)
    mprec = np.hstack([np.zeros((n, 1)), precision, np.zeros((n, 1))])
    mrec = np.hstack([np.zeros((n, 1)), recall, np.ones((n, 1))])
    envelope = np.maximum.accumulate(mprec[:, ::-1], axis=1)[:, ::-1]
    return (np.diff(mrec, axis=1) * envelope[:, 1:]).sum(1)


def average_precision(matched: np.ndarray, n_gt: int) -> np.ndarray:
    """AP per threshold from `match`'s (n_thr, P) matches; NaN without ground truth."""
    if n_gt == 0:
        return np.full(len(matched), np.nan)
    if matched.shape[1] == 0:
        return np.zeros(len(matched))
    tp = np.cumsum(matched >= 0, axis=1)
    fp = np.cumsum(matched < 0, axis=1)
    return interpolated_ap(tp / (tp + fp), tp / n_gt)


@dataclass
class Evaluation:
    ap: np.ndarray            # (n_thr, C), NaN for classes without ground truth
    pred_len: np.ndarray      # lengths (s) of the predictions matched at the lowest threshold
    gt_len: np.ndarray        # lengths (s) of the ground truths they matched


def evaluate_detections(pred: Detections, gt_video: np.ndarray, gt_label: np.ndarray, gt_segment: np.ndarray,
                        num_classes: int, tiou_thresholds: np.ndarray = TIOU_THRESHOLDS) -> Evaluation:
    ap = np.full((len(tiou_thresholds), num_classes), np.nan)
    pred_len, gt_len = [], []
    for c in range(num_classes):
        g = gt_label == c
        p = pred.take(pred.label == c)
        order, matched = match(p, gt_video[g], gt_segment[g], tiou_thresholds)
        ap[:, c] = average_precision(matched, int(g.sum()))
        hit = matched[0] >= 0
        pred_seg, gt_seg = p.segment[order][hit], gt_segment[g][matched[0][hit]]
        pred_len.append(pred_seg[:, 1] - pred_seg[:, 0])
        gt_len.append(gt_seg[:, 1] - gt_seg[:, 0])
    return Evaluation(ap, np.concatenate(pred_len), np.concatenate(gt_len))


# ---------------------------------------------------------------------------------------------------
# metrics of a split

def metric_names(class_names: list[str]) -> list[str]:
    """`ap_<name>` per class: ASCII lower case (accents dropped), every other character an underscore,
    made unique by the class id."""
    names = []
    for i, name in enumerate(class_names):
        ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower()
        key = "ap_" + (re.sub(r"[^0-9a-z]+", "_", ascii_name).strip("_") or str(i))
        names.append(f"{key}_{i}" if key in names else key)
    return names


def ground_truth(video_ids: list[str], segments: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    index = {v: i for i, v in enumerate(video_ids)}
    return (segments["video_id"].map(index).to_numpy(int), segments["class_id"].to_numpy(int),
            segments[["t_start", "t_end"]].to_numpy(float))


def detection_metrics(pred: Detections, gt: tuple[np.ndarray, np.ndarray, np.ndarray], class_names: list[str],
                      prefix: str = "", per_class: bool = True) -> dict[str, float]:
    """`mAP` (mean over tIoU 0.1:0.7), `mAP_01`..`mAP_07`, `ap_<class>` (mean over tIoU) and the
    segment-length observation: `mean_pred_len`, `mean_gt_len` (s) over the predictions matched at
    tIoU 0.1 and the ground truths they matched, `len_ratio` = their quotient (< 1 incomplete, > 1
    over-complete); 0 when nothing matched."""
    ev = evaluate_detections(pred, *gt, num_classes=len(class_names))
    with np.errstate(invalid="ignore"):
        by_thr = np.nanmean(ev.ap, axis=1) if np.isfinite(ev.ap).any() else np.zeros(len(ev.ap))
    out = {f"{prefix}mAP": float(by_thr.mean())}
    out.update({f"{prefix}mAP_{round(t * 10):02d}": float(v) for t, v in zip(TIOU_THRESHOLDS, by_thr)})
    if per_class:
        names = metric_names(class_names)
        out.update({f"{prefix}{name}": float(ev.ap[:, c].mean()) for c, name in enumerate(names)
                    if np.isfinite(ev.ap[:, c]).all()})
    # nothing matched, nothing observed: all three 0, a tie, so that a strict claim comparing the two
    # lengths cannot hold on a model that finds nothing (NaN would stop the claim's statistics)
    matched = len(ev.gt_len) > 0
    pred_len = float(ev.pred_len.mean()) if matched else 0.0
    gt_len = float(ev.gt_len.mean()) if matched else 0.0
    out.update({f"{prefix}mean_pred_len": pred_len, f"{prefix}mean_gt_len": gt_len,
                f"{prefix}len_ratio": pred_len / gt_len if matched else 0.0})
    return out
