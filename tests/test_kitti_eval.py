"""tasks/kinds/detection3d/kitti_eval.py: AP_R40 against closed-form cases and against a brute-force
reference of the devkit's matching rules written here with plain loops."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tasks.kinds.detection3d.boxes import bev_iou, iou_3d
from tasks.kinds.detection3d.kitti_eval import (FrameDetections, FrameTruth, ap_curves, average_precision,
                                                evaluate)

CAR = (4.0, 1.8, 1.5)
SIZES = {"Car": CAR, "Van": (5.0, 2.0, 2.2), "Truck": (8.0, 2.5, 3.0), "Pedestrian": (0.8, 0.7, 1.75),
         "Person_sitting": (0.8, 0.7, 1.2), "Cyclist": (1.8, 0.6, 1.7)}


def box(x: float, y: float = 0.0, dims=CAR, z: float = 0.0, heading: float = 0.0) -> list[float]:
    return [x, y, z, *dims, heading]


def truth(rows, names) -> FrameTruth:
    return FrameTruth(np.asarray(rows, dtype=np.float64).reshape(-1, 7), list(names))


def detections(rows, scores, names) -> FrameDetections:
    return FrameDetections(np.asarray(rows, dtype=np.float64).reshape(-1, 7),
                           np.asarray(scores, dtype=np.float64), list(names))


def cars_in_a_row(n_frames: int, per_frame: int) -> list[list[list[float]]]:
    """Per frame, `per_frame` cars 10 m apart: no two overlap."""
    return [[box(10.0 * k) for k in range(per_frame)] for _ in range(n_frames)]


def perfect(frames, scores=None):
    """Ground truth and exact copies as detections, with distinct scores."""
    n = sum(len(f) for f in frames)
    scores = iter(np.linspace(1.0, 0.1, n) if scores is None else scores)
    truths = [truth(f, ["Car"] * len(f)) for f in frames]
    dets = [detections(f, [next(scores) for _ in f], ["Car"] * len(f)) for f in frames]
    return dets, truths


def shift_for_iou(iou: float, length: float = CAR[0]) -> float:
    """Shift along a same-size box's length giving this IoU (BEV and 3D alike): (L - d) / (L + d)."""
    return length * (1 - iou) / (1 + iou)


# --- closed-form cases ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bev", "3d"])
def test_perfect_detections_score_one(kind):
    dets, truths = perfect(cars_in_a_row(10, 5))
    result = average_precision(dets, truths, "Car", kind)
    assert result["n_gt"] == 50
    assert result["ap"] == pytest.approx(1.0)
    np.testing.assert_array_equal(result["precision"], np.ones(40))
    assert result["recall"][-1] == 1.0 and result["precision"].shape == result["recall"].shape == (40,)


@pytest.mark.parametrize("n, expected", [(1, 0.0), (2, 1 / 40), (40, 39 / 40), (41, 1.0)])
def test_small_sets_fall_short_as_in_the_devkit(n, expected):
    """Each true positive serves one recall position at most and slot 0 is dropped: with fewer than 41
    objects even perfect detections score below 1 (the devkit's Python R40 does the same)."""
    dets, truths = perfect(cars_in_a_row(n, 1))
    assert average_precision(dets, truths, "Car")["ap"] == pytest.approx(expected)


def test_no_detections_score_zero():
    frames = cars_in_a_row(5, 3)
    truths = [truth(f, ["Car"] * 3) for f in frames]
    dets = [detections([], [], []) for _ in frames]
    result = average_precision(dets, truths, "Car", "3d")
    assert result["ap"] == 0.0 and result["n_gt"] == 15
    assert not result["precision"].any()


def test_half_found_with_perfect_precision():
    """80 cars, 40 found exactly: precision 1 up to recall 1/2, so 20 of the 40 positions."""
    frames = cars_in_a_row(20, 4)
    truths = [truth(f, ["Car"] * 4) for f in frames]
    dets = [detections(f[:2], [1 - 0.01 * i, 0.5 - 0.01 * i], ["Car"] * 2) for i, f in enumerate(frames)]
    result = average_precision(dets, truths, "Car", "bev")
    assert result["ap"] == pytest.approx(0.5)
    np.testing.assert_array_equal(result["precision"], [1.0] * 20 + [0.0] * 20)
    assert result["recall"][19] == 0.5


def _with_false_positive(score: float):
    """80 cars found exactly (scores 1 .. 0.21) and one FP far from all of them, scored `score`."""
    dets, truths = perfect(cars_in_a_row(20, 4), scores=np.linspace(1.0, 0.21, 80))
    fp = dets[0]
    dets[0] = detections(np.vstack([fp.boxes, box(500.0)]), np.append(fp.scores, score), fp.names + ["Car"])
    return dets, truths


def test_false_positive_above_every_true_positive():
    """Raw precision at the k-th threshold is tp / (tp + 1), rising with recall; interpolation (best
    precision at that recall or beyond) makes every slot 80/81."""
    result = average_precision(*_with_false_positive(2.0), "Car")
    np.testing.assert_allclose(result["precision"], np.full(40, 80 / 81), rtol=0, atol=1e-15)
    assert result["ap"] == pytest.approx(80 / 81)


def test_false_positive_midway():
    """FP ranked between the 40th and 41st TP: slots 1..20 (recall up to 1/2: thresholds at TPs 2, 4, ..,
    40) keep precision 1, slots 21..40 get the final 80/81."""
    result = average_precision(*_with_false_positive(0.605), "Car")
    np.testing.assert_allclose(result["precision"], [1.0] * 20 + [80 / 81] * 20, rtol=0, atol=1e-15)
    assert result["ap"] == pytest.approx((20 + 20 * 80 / 81) / 40)


def test_score_thresholds_follow_the_devkit_walk():
    """8 objects, all found, 4 recall positions (0, 1/4, .., 1; binary fractions so no rounding): the
    walk stops at recalls 1/8 (nearest to 0), 2/8, 4/8, 6/8, 8/8."""
    dets, truths = perfect(cars_in_a_row(8, 1), scores=[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    result = average_precision(dets, truths, "Car", recall_points=4)
    np.testing.assert_array_equal(result["score_thresholds"], [0.9, 0.8, 0.6, 0.4, 0.2])
    np.testing.assert_array_equal(result["recall"], [2 / 8, 4 / 8, 6 / 8, 1.0])
    assert result["ap"] == 1.0


def test_score_thresholds_break_midpoint_ties_as_the_devkit():
    """60 objects all found: the recall positions k/40 fall exactly midway between two TPs' recalls at
    times, where the walk stops at the lower one (not strictly nearer to the next). The indices are those
    OpenPCDet's `get_thresholds` returns for 60 distinct scores and n_gt = 60."""
    devkit = [0, 1, 2, 4, 5, 6, 8, 9, 11, 12, 14, 15, 17, 19, 20, 22, 23, 25, 26, 28, 29, 31, 32, 34, 35,
              37, 38, 40, 41, 43, 44, 46, 47, 49, 50, 52, 53, 55, 56, 58, 59]
    scores = np.arange(60, 0, -1) / 60.0
    dets, truths = perfect(cars_in_a_row(12, 5), scores=scores)
    result = average_precision(dets, truths, "Car")
    np.testing.assert_array_equal(result["score_thresholds"], scores[devkit])


@pytest.mark.parametrize("cls, similar, other", [("Car", "Van", "Truck"),
                                                 ("Pedestrian", "Person_sitting", "Cyclist")])
def test_detection_on_a_similar_class_is_not_a_false_positive(cls, similar, other):
    """50 objects found exactly plus one top-scored detection on a Van (for Car): no FP, AP 1. The same
    detection on a Truck is an FP: every slot's precision drops to 50/51."""
    dims = SIZES[cls]
    frames = [[box(10.0 * k, dims=dims) for k in range(5)] for _ in range(10)]
    for extra, expected in ((similar, 1.0), (other, 50 / 51)):
        truths = [truth(f, [cls] * 5) for f in frames]
        scores = np.linspace(0.9, 0.1, 50).reshape(10, 5)
        dets = [detections(f, s, [cls] * 5) for f, s in zip(frames, scores)]
        extra_box = box(100.0, dims=SIZES[extra])
        truths[0] = truth(frames[0] + [extra_box], [cls] * 5 + [extra])
        dets[0] = detections(frames[0] + [extra_box], np.append(dets[0].scores, 1.0), [cls] * 6)
        result = average_precision(dets, truths, cls, "3d")
        assert result["n_gt"] == 50
        assert result["ap"] == pytest.approx(expected), extra


@pytest.mark.parametrize("kind", ["bev", "3d"])
def test_iou_threshold_edge(kind):
    """50 frames, one car each, each detection shifted to give IoU just above / just below 0.7."""
    def run(iou: float, **kw):
        truths = [truth([box(0.0)], ["Car"]) for _ in range(50)]
        dets = [detections([box(shift_for_iou(iou))], [1 - 0.01 * i], ["Car"]) for i in range(50)]
        return average_precision(dets, truths, "Car", kind, **kw)["ap"]

    assert run(0.7 + 1e-6) == pytest.approx(1.0)
    assert run(0.7 - 1e-6) == 0.0
    # a match needs IoU strictly above the threshold, as the devkit's `overlap > min_overlap`
    fn = bev_iou if kind == "bev" else iou_3d
    exact = float(fn(torch.tensor([box(0.0)], dtype=torch.float64),
                    torch.tensor([box(shift_for_iou(0.75))], dtype=torch.float64))[0, 0])
    assert run(0.75, threshold=exact) == 0.0
    assert run(0.75, threshold=np.nextafter(exact, 0.0)) == pytest.approx(1.0)


def test_two_detections_on_one_object_give_one_tp_and_one_fp():
    """50 cars found exactly; car 0 also gets a second exact copy, scored above everything and listed
    after the first. It is the TP while alone above the threshold; once the first copy counts too, the
    IoU tie goes to the earlier detection and the copy is the one FP: every slot 50/51."""
    dets, truths = perfect(cars_in_a_row(10, 5))
    first = dets[0]
    dets[0] = detections(np.vstack([first.boxes, first.boxes[:1]]), np.append(first.scores, 2.0),
                         first.names + ["Car"])
    result = average_precision(dets, truths, "Car", "bev")
    assert result["score_thresholds"][0] == 2.0
    np.testing.assert_allclose(result["precision"], np.full(40, 50 / 51), rtol=0, atol=1e-15)
    assert result["ap"] == pytest.approx(50 / 51)


def test_counting_pass_matches_by_iou_not_score():
    """The devkit's counting pass gives each object the free detection with the highest IoU. Object A
    (first) and B 0.9 m apart; detection p (scored higher) overlaps A only, q overlaps A more than p
    does and B too. By score A would take p and B q; by IoU A takes q and p is left an FP."""
    a, b, p, q = box(0.0), box(0.9), box(-0.5), box(0.3)
    n = 48
    truths = [truth([a, b], ["Car", "Car"]) for _ in range(n)]
    dets = [detections([p, q], [0.9 - 0.001 * i, 0.5 - 0.001 * i], ["Car", "Car"]) for i in range(n)]
    result = average_precision(dets, truths, "Car", "bev")
    assert result["n_gt"] == 2 * n
    assert result["recall"].max() == 0.5
    assert result["precision"][-1] == 0.5   # at the lowest threshold: n TPs (A), n FPs (p)
    assert result["ap"] < 1.0


# --- evaluate / ap_curves / inputs ---------------------------------------------------------------------

def test_evaluate_reports_classes_with_truth_only():
    cars, people = cars_in_a_row(10, 5), [[box(5.0, 5.0, SIZES["Pedestrian"])] for _ in range(10)]
    truths = [truth(c + p, ["Car"] * 5 + ["Pedestrian"]) for c, p in zip(cars, people)]
    dets = [detections(c[:2] + p, [0.9, 0.8, 0.7], ["Car", "Car", "Pedestrian"])
            for c, p in zip(cars, people)]
    metrics = evaluate(dets, truths)
    assert set(metrics) == {"car_bev_ap", "car_3d_ap", "pedestrian_bev_ap", "pedestrian_3d_ap",
                            "mAP_bev", "mAP_3d"}
    for kind in ("bev", "3d"):
        car, ped = metrics[f"car_{kind}_ap"], metrics[f"pedestrian_{kind}_ap"]
        assert car == pytest.approx(average_precision(dets, truths, "Car", kind)["ap"])
        assert metrics[f"mAP_{kind}"] == pytest.approx((car + ped) / 2)
        assert 0.0 <= car <= 1.0 and 0.0 <= ped <= 1.0
    curves = ap_curves(dets, truths)
    assert set(curves) == {"Car", "Pedestrian"} and set(curves["Car"]) == {"bev", "3d"}
    assert curves["Pedestrian"]["3d"]["precision"].shape == (40,)


def test_class_without_truth_and_bad_inputs():
    dets, truths = perfect(cars_in_a_row(2, 2))
    assert math.isnan(average_precision(dets, truths, "Cyclist")["ap"])
    with pytest.raises(ValueError):
        evaluate([], [])
    with pytest.raises(ValueError):
        average_precision(dets, truths[:1], "Car")
    with pytest.raises(ValueError):
        average_precision(dets, truths, "Car", iou="2d")


# --- brute-force reference -----------------------------------------------------------------------------

REF_THRESHOLDS = {"Car": 0.7, "Pedestrian": 0.5, "Cyclist": 0.5}
REF_SIMILAR = {"Car": "Van", "Pedestrian": "Person_sitting", "Cyclist": None}


def reference_ap(dets, truths, cls, kind, n_points=40):
    """The devkit's rules, one frame, one object, one detection at a time. Returns (ap, 41 slots)."""
    thr, similar = REF_THRESHOLDS[cls], REF_SIMILAR[cls]
    iou_fn = bev_iou if kind == "bev" else iou_3d
    frames = []
    for d, t in zip(dets, truths):
        objects = [(g, name == cls) for g, name in enumerate(t.names) if name in (cls, similar)]
        cands = [(j, float(d.scores[j])) for j, name in enumerate(d.names) if name == cls]
        full = iou_fn(torch.tensor(d.boxes), torch.tensor(t.boxes)).tolist() if objects and cands else None
        frames.append((objects, cands, full))
    n_gt = sum(valid for objects, _, _ in frames for _, valid in objects)

    tp_scores = []   # collecting pass: the highest score above the IoU threshold
    for objects, cands, full in frames:
        used = set()
        for g, valid in objects:
            best, best_score = None, -math.inf
            for j, score in cands:
                if j not in used and full[j][g] > thr and score > best_score:
                    best, best_score = j, score
            if best is not None:
                used.add(best)
                if valid:
                    tp_scores.append(best_score)

    tp_scores.sort(reverse=True)
    thresholds, aim = [], 0.0
    for i, score in enumerate(tp_scores):
        last = i + 1 == len(tp_scores)
        left = (i + 1) / n_gt
        right = left if last else (i + 2) / n_gt
        if not last and right - aim < aim - left:
            continue
        thresholds.append(score)
        aim += 1 / n_points

    precision = [0.0] * (n_points + 1)
    for k, t in enumerate(thresholds):
        tp = fp = 0
        for objects, cands, full in frames:   # counting pass: the highest IoU
            used = set()
            for g, valid in objects:
                best, best_iou = None, 0.0
                for j, score in cands:
                    if score >= t and j not in used and full[j][g] > thr and full[j][g] > best_iou:
                        best, best_iou = j, full[j][g]
                if best is not None:
                    used.add(best)
                    tp += valid
            fp += sum(1 for j, score in cands if score >= t and j not in used)
        precision[k] = tp / (tp + fp) if tp + fp else 0.0
    precision = [max(precision[k:]) for k in range(n_points + 1)]
    return sum(precision[1:]) / n_points, precision


def random_scene(seed: int, n_frames: int = 20):
    """Objects of six types, some crowded together; detections as jittered copies (some relabelled,
    some doubled), plus stray boxes; scores on a 0.01 grid so ties occur; detections shuffled."""
    rng = np.random.default_rng(seed)
    types = list(SIZES)
    relabel = {"Van": ["Car", "Van"], "Truck": ["Car", "Truck"], "Person_sitting": ["Pedestrian"],
               "Car": ["Car"] * 9 + ["Cyclist"], "Pedestrian": ["Pedestrian"] * 9 + ["Cyclist"],
               "Cyclist": ["Cyclist"] * 9 + ["Pedestrian"]}
    dets, truths = [], []
    for _ in range(n_frames):
        names = list(rng.choice(types, rng.integers(3, 11), p=[0.35, 0.1, 0.05, 0.25, 0.1, 0.15]))
        rows = []
        for i, name in enumerate(names):
            if i > 0 and rng.random() < 0.3:
                # crowded: a copy of the previous object slid a little along its heading, so one detection
                # can overlap two objects and the matching order and rule matter
                prev = rows[-1]
                slide = rng.uniform(0.1, 0.4) * prev[3]
                rows.append(prev + np.r_[slide * np.cos(prev[6]), slide * np.sin(prev[6]), 0, 0, 0, 0, 0])
                names[i] = names[i - 1] if rng.random() < 0.7 else name
                continue
            dims = np.asarray(SIZES[name]) * rng.uniform(0.9, 1.1, 3)
            centre = [*rng.uniform(-20, 20, 2), rng.uniform(-1, 1)]
            rows.append(np.array([*centre, *dims, rng.uniform(-np.pi, np.pi)]))
        det_rows, det_names = [], []
        for row, name in zip(rows, names):
            for _ in range(rng.choice([0, 1, 1, 1, 2])):
                s = rng.choice([0.03, 0.1, 0.3])
                jitter = np.concatenate([rng.normal(0, s, 3), rng.normal(0, s / 3, 3), rng.normal(0, s, 1)])
                det_rows.append(row + jitter * np.r_[1, 1, 1, row[3:6], 1])
                det_names.append(str(rng.choice(relabel[name])))
        for _ in range(rng.integers(0, 4)):
            name = str(rng.choice(["Car", "Pedestrian", "Cyclist"]))
            det_rows.append(np.array([*rng.uniform(-20, 20, 2), 0, *SIZES[name], rng.uniform(-3, 3)]))
            det_names.append(name)
        order = rng.permutation(len(det_rows))
        scores = np.round(rng.uniform(0.05, 1.0, len(det_rows)), 2)
        dets.append(detections([det_rows[o] for o in order], scores, [det_names[o] for o in order]))
        truths.append(truth(rows, names))
    return dets, truths


@pytest.mark.parametrize("seed", [1, 2, 4])   # scenes where counting by score instead of IoU would differ
@pytest.mark.parametrize("kind", ["bev", "3d"])
def test_matches_brute_force_reference(seed, kind):
    dets, truths = random_scene(seed)
    for cls in ("Car", "Pedestrian", "Cyclist"):
        ref_ap, ref_precision = reference_ap(dets, truths, cls, kind)
        result = average_precision(dets, truths, cls, kind)
        np.testing.assert_allclose(result["precision"], ref_precision[1:], rtol=0, atol=1e-12, err_msg=cls)
        assert result["ap"] == pytest.approx(ref_ap, abs=1e-12), cls
        assert 0.0 < result["ap"] < 1.0, cls   # the scene is neither trivial nor hopeless
