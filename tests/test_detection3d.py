"""The 3D detection kind (issue 13): CenterPoint targets and decoding against closed forms, the loss
terms against hand computation, and the kind end to end on ray-cast frames (train, score, figures)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from models import create_model
from models.detection3d import (BEVGrid, backbone_flops, decode, encode_targets, focal_heatmap_loss,
                                masked_l1)
from models.distill import DistillationLoss
from tasks.kinds import get_kind
from tasks.platform.params import TrainParams
from tasks.stages import scans, voxelize
from tasks.train.loop import fit
from test_scans import GENERATE, write_params

GRID = BEVGrid(x0=0.0, y0=-40.0, cell=1.6, cells=(50, 44))


def boxes_and_labels():
    # centres off the cell grid, headings on both sides of zero, one box per class
    boxes = torch.tensor([[12.3, -5.1, -0.9, 3.9, 1.6, 1.5, 0.3],
                          [30.9, 7.7, -1.0, 0.8, 0.6, 1.7, -2.0],
                          [21.0, -17.4, -0.8, 1.8, 0.6, 1.7, 1.2]])
    return boxes, torch.tensor([0, 1, 2])


def test_targets_put_a_unit_peak_at_each_centre_cell_and_the_box_there():
    boxes, labels = boxes_and_labels()
    heat, reg, mask = encode_targets(boxes, labels, GRID, 3)
    assert mask.sum() == 3
    for b, c in zip(boxes, labels):
        iu, iv = int((b[0] - GRID.x0) / GRID.cell), int((b[1] - GRID.y0) / GRID.cell)
        assert heat[c, iv, iu] == 1.0 and heat[c].max() == 1.0
        r = reg[:, iv, iu]
        assert GRID.x0 + (iu + r[0]) * GRID.cell == pytest.approx(float(b[0]), abs=1e-5)
        assert r[3:6].exp().tolist() == pytest.approx(b[3:6].tolist(), rel=1e-5)
        # the doubled angle: a footprint is the same turned by π
        assert math.atan2(r[6], r[7]) / 2 % math.pi == pytest.approx(float(b[6]) % math.pi, abs=1e-6)


def test_a_box_off_the_map_gets_no_target():
    heat, _, mask = encode_targets(torch.tensor([[-3.0, 0.0, -1.0, 4.0, 1.6, 1.5, 0.0]]), torch.tensor([0]), GRID, 3)
    assert mask.sum() == 0 and heat.sum() == 0


def test_decoding_perfect_maps_gives_the_boxes_back():
    boxes, labels = boxes_and_labels()
    heat, reg, _ = encode_targets(boxes, labels, GRID, 3)
    logits = torch.logit(heat.clamp(1e-6, 1 - 1e-6))
    (out_boxes, scores, classes), = decode(logits[None], reg[None], GRID, min_score=0.5)
    order = classes.argsort()
    assert classes[order].tolist() == [0, 1, 2]
    out_boxes = out_boxes[order]
    assert out_boxes[:, :6].numpy() == pytest.approx(boxes[:, :6].numpy(), abs=1e-4)
    assert (out_boxes[:, 6] % math.pi).numpy() == pytest.approx((boxes[:, 6] % math.pi).numpy(), abs=1e-5)
    assert (scores > 0.99).all()


def test_the_focal_loss_matches_a_hand_computation():
    # two cells: a centre (target 1) at p = 0.8, a background cell (target 0.5) at p = 0.3
    p = torch.tensor([0.8, 0.3])
    logits = torch.logit(p).reshape(1, 1, 1, 2)
    target = torch.tensor([1.0, 0.5]).reshape(1, 1, 1, 2)
    expected = -(math.log(0.8) * 0.2 ** 2) - (math.log(0.7) * 0.3 ** 2 * 0.5 ** 4)   # over 1 centre
    assert float(focal_heatmap_loss(logits, target)) == pytest.approx(expected, rel=1e-5)


def test_the_box_loss_counts_only_the_centres():
    pred, target = torch.zeros(1, 8, 2, 2), torch.ones(1, 8, 2, 2)
    mask = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert float(masked_l1(pred, target, mask)) == pytest.approx(8.0)   # 8 channels × |0 - 1|, one centre


# ---------------------------------------------------------------------------------------------------
# the kind on ray-cast frames

VOXEL = {"point_range": [0, -40, -3, 70.4, 40, 1], "voxel_size": [0.4, 0.4, 0.4], "max_points": 5,
         "max_voxels": 12000, "features": "mean"}


@pytest.fixture(scope="module")
def voxels(tmp_path_factory):
    work = tmp_path_factory.mktemp("det")
    write_params(work, {**GENERATE, "n_scenes": 10, "azimuth_step_deg": 1.2}, VOXEL)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        scans.build("t", "scans")
        voxelize.build("t", "scans", "voxels")
    return str(work / "voxels")


TINY = {"widths": [8, 8, 16], "bev_channels": 16}


def test_the_kind_trains_scores_and_draws_a_detector(voxels):
    kind = get_kind("detection3d")
    data = kind.load(voxels, validate=True)
    assert data.shape_zyx == (10, 200, 176) and data.bev.cells == (50, 44)
    spec = SimpleNamespace(teacher="second_det", student="sps_det")
    tp = TrainParams(epochs=2, batch_size=4, lr=0.003, model=TINY)
    torch.manual_seed(0)
    teacher = kind.build(spec, "teacher", data, tp)
    history = fit(teacher, DistillationLoss(kind.labels_loss), kind.train_set(data, None), tp, seed=0,
                  forward=kind.forward, validate=lambda m: kind.validate(m, data, None, torch.device("cpu")))
    assert len(history) == 2 and history[1]["train_loss"] < history[0]["train_loss"]
    metrics = kind.test_metrics(kind.predictor(teacher, data), data, None)
    assert {"car_bev_ap", "car_3d_ap", "car_bev_ap50", "mAP_bev", "backbone_gflops", "latency_ms",
            "dense_latency_ms"} <= set(metrics)
    assert all(0 <= metrics[k] <= 1 for k in metrics if k.endswith("ap") or k.startswith("mAP"))
    # the dense run does the same layers on every cell of the grid: far slower than the sparse one
    assert metrics["dense_latency_ms"] > metrics["latency_ms"] > 0

    product = kind.build(spec, "student", data, tp)
    product.load_state_dict(teacher.state_dict())  # the same weights, pruned
    pruned = kind.test_metrics(kind.predictor(product, data), data, None)
    assert "dense_latency_ms" not in pruned
    assert pruned["backbone_gflops"] < metrics["backbone_gflops"]

    figures = kind.report_figures([], data, teacher, None, product)
    assert set(figures) == {"bev_boxes.png", "pr_curves.png", "pruning_mask.png"}


def test_pruning_at_keep_one_costs_what_the_unpruned_backbone_costs(voxels):
    data = get_kind("detection3d").load(voxels)
    from tasks.kinds.detection3d.kind import batch_inputs
    inputs = batch_inputs(data.splits["train"].frames[:2])
    torch.manual_seed(0)
    full = create_model("second_det", shape_zyx=data.shape_zyx, **TINY).eval()
    same = create_model("sps_det", shape_zyx=data.shape_zyx, keep_ratio=1.0, **TINY).eval()
    same.load_state_dict(full.state_dict())
    half = create_model("sps_det", shape_zyx=data.shape_zyx, keep_ratio=0.5, **TINY).eval()
    half.load_state_dict(full.state_dict())
    with torch.no_grad():
        a, b, _ = full(inputs), same(inputs), half(inputs)
    assert torch.allclose(a["heatmap"], b["heatmap"], atol=1e-5) and backbone_flops(full) == backbone_flops(same)
    assert backbone_flops(half) < backbone_flops(full)


def test_distillation_reads_the_teachers_bev_features_and_heatmaps(voxels):
    kind = get_kind("detection3d")
    data = kind.load(voxels)
    from tasks.methods import get_method, loss_terms
    spec = get_method("sps_student")
    tp = TrainParams(epochs=1, batch_size=4, lr=0.003, cache_teacher=True, model=TINY)
    torch.manual_seed(0)
    teacher = create_model("second_det", shape_zyx=data.shape_zyx, **{**TINY, "widths": [8, 16, 16]})
    student = kind.build(spec, "student", data, tp)
    criterion = DistillationLoss(loss_terms(spec, None))
    history = fit(student, criterion, kind.train_set(data, None), tp, seed=0, forward=kind.forward,
                  validate=lambda m: {"val_mAP_bev": 0.0}, teacher=teacher, taps=spec.feature_taps, cache_batch=4)
    row = history[0]
    assert {"train_loss_centerpoint", "train_loss_heatmap_kd", "train_loss_hint"} <= set(row)
    assert all(np.isfinite(v) and v >= 0 for k, v in row.items() if k.startswith("train_loss"))
