"""tasks/kinds/detection3d/boxes.py: rotated IoU against shapely's polygon intersection and a grid-sampling
estimate, NMS against a plain greedy loop."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

try:
    import shapely   # dev dependency, to be pinned: shapely==2.2.0
except ImportError:
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("shapely is not installed", allow_module_level=True)

from tasks.kinds.detection3d.boxes import bev_corners, bev_iou, iou_3d, nms_bev, points_in_boxes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def random_boxes(rng: np.random.Generator, k: int, spread: float = 3.0) -> np.ndarray:
    return np.concatenate([rng.uniform(-spread, spread, (k, 2)), rng.uniform(-1, 1, (k, 1)),
                           rng.uniform(0.3, 4, (k, 3)), rng.uniform(-4, 4, (k, 1))], 1)


def footprint(box: np.ndarray) -> shapely.Polygon:
    """The footprint built here from the box parameters: its corners rotated about the centre."""
    x, y, _, dx, dy, _, h = box
    c, s = np.cos(h), np.sin(h)
    local = [(dx / 2, dy / 2), (-dx / 2, dy / 2), (-dx / 2, -dy / 2), (dx / 2, -dy / 2)]
    return shapely.Polygon([(x + c * u - s * v, y + s * u + c * v) for u, v in local])


def shapely_iou(a: np.ndarray, b: np.ndarray, three_d: bool = False) -> float:
    pa, pb = footprint(a), footprint(b)
    inter = pa.intersection(pb).area
    if not three_d:
        return inter / (pa.area + pb.area - inter)
    dz = max(0.0, min(a[2] + a[5] / 2, b[2] + b[5] / 2) - max(a[2] - a[5] / 2, b[2] - b[5] / 2))
    vol = inter * dz
    return vol / (a[3] * a[4] * a[5] + b[3] * b[4] * b[5] - vol)


def special_pairs() -> tuple[np.ndarray, np.ndarray]:
    """Identical, contained, touching along an edge, far apart, a square turned by 45° and by 90°,
    a needle across a box, sharing a corner."""
    a = np.array([[0, 0, 0, 2, 1, 1, 0], [0, 0, 0, 4, 4, 1, 0.3], [0, 0, 0, 2, 2, 1, 0], [0, 0, 0, 1, 1, 1, 0],
                  [0, 0, 0, 2, 2, 2, 0], [0, 0, 0, 2, 2, 2, 0], [0, 0, 0, 4, 0.01, 1, 0.7], [0, 0, 0, 2, 2, 1, 0]])
    b = np.array([[0, 0, 0, 2, 1, 1, 0], [0.2, 0.1, 0.5, 1, 1, 0.5, 1.1], [2, 0, 0, 2, 2, 1, 0],
                  [30, 30, 0, 1, 1, 1, 0], [0, 0, 0, 2, 2, 2, np.pi / 4], [0, 0, 0, 2, 2, 2, np.pi / 2],
                  [0, 0, 0, 1, 1, 1, 0], [2, 2, 0, 2, 2, 1, 0]])
    return a, b


@pytest.mark.parametrize("device", DEVICES)
def test_bev_and_3d_iou_match_shapely(device):
    rng = np.random.default_rng(0)
    a, b = random_boxes(rng, 60), random_boxes(rng, 45)
    ta, tb = torch.from_numpy(a).to(device), torch.from_numpy(b).to(device)
    bev, vol = bev_iou(ta, tb).cpu().numpy(), iou_3d(ta, tb).cpu().numpy()
    ref_bev = np.array([[shapely_iou(x, y) for y in b] for x in a])
    ref_vol = np.array([[shapely_iou(x, y, True) for y in b] for x in a])
    assert 0.1 < (ref_bev > 0).mean() < 0.9
    np.testing.assert_allclose(bev, ref_bev, atol=1e-9)
    np.testing.assert_allclose(vol, ref_vol, atol=1e-9)
    # aligned pairs are the diagonal
    np.testing.assert_allclose(bev_iou(ta[:45], tb, aligned=True).cpu().numpy(), np.diag(ref_bev[:45]), atol=1e-9)
    np.testing.assert_allclose(iou_3d(ta[:45], tb, aligned=True).cpu().numpy(), np.diag(ref_vol[:45]), atol=1e-9)


def test_special_cases_match_shapely():
    a, b = special_pairs()
    got = bev_iou(torch.from_numpy(a), torch.from_numpy(b), aligned=True).numpy()
    ref = np.array([shapely_iou(x, y) for x, y in zip(a, b)])
    np.testing.assert_allclose(got, ref, atol=1e-9)
    assert got[0] == pytest.approx(1.0) and got[2] == 0 and got[3] == 0 and got[5] == pytest.approx(1.0)
    assert got[7] == 0          # a shared corner has no area
    got3 = iou_3d(torch.from_numpy(a), torch.from_numpy(b), aligned=True).numpy()
    np.testing.assert_allclose(got3, [shapely_iou(x, y, True) for x, y in zip(a, b)], atol=1e-9)


def test_iou_against_grid_sampling():
    """Intersection and union counted on a fine grid over both boxes: no polygon code at all."""
    rng = np.random.default_rng(7)
    a, b = random_boxes(rng, 6, spread=0.8), random_boxes(rng, 6, spread=0.8)
    got_bev = bev_iou(torch.from_numpy(a), torch.from_numpy(b), aligned=True).numpy()
    got_3d = iou_3d(torch.from_numpy(a), torch.from_numpy(b), aligned=True).numpy()
    for i in range(6):
        lo = np.minimum(a[i, :3] - a[i, 3:6].max() / 1.4, b[i, :3] - b[i, 3:6].max() / 1.4)
        hi = np.maximum(a[i, :3] + a[i, 3:6].max() / 1.4, b[i, :3] + b[i, 3:6].max() / 1.4)
        axes = [np.linspace(lo[d], hi[d], 120) for d in range(3)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)

        def inside(box, pts, flat):
            d = pts - box[:3]
            c, s = np.cos(box[6]), np.sin(box[6])
            ok = (abs(c * d[:, 0] + s * d[:, 1]) <= box[3] / 2) & (abs(-s * d[:, 0] + c * d[:, 1]) <= box[4] / 2)
            return ok if flat else ok & (abs(d[:, 2]) <= box[5] / 2)

        plane = grid[np.isclose(grid[:, 2], axes[2][0])]
        ia, ib = inside(a[i], plane, True), inside(b[i], plane, True)
        assert got_bev[i] == pytest.approx((ia & ib).sum() / (ia | ib).sum(), abs=0.02)
        ia, ib = inside(a[i], grid, False), inside(b[i], grid, False)
        assert got_3d[i] == pytest.approx((ia & ib).sum() / (ia | ib).sum(), abs=0.02)
    assert (got_bev > 0).sum() >= 3


def greedy_nms(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> list[int]:
    order = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
    keep: list[int] = []
    for i in order:
        if all(shapely_iou(boxes[i], boxes[j]) <= thresh for j in keep):
            keep.append(i)
    return keep


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("thresh", [0.1, 0.5])
def test_nms_matches_a_greedy_loop(thresh, device):
    rng = np.random.default_rng(int(thresh * 10))
    centres = random_boxes(rng, 8, spread=10)
    jitter = rng.normal(0, 0.3, (8, 12, 7)) * [1, 1, 1, 0.5, 0.5, 0.5, 1]   # 12 noisy copies of each
    boxes = (centres[:, None] + jitter).reshape(-1, 7)
    boxes[:, 3:6] = np.abs(boxes[:, 3:6]) + 0.1
    scores = rng.uniform(0, 1, len(boxes)).round(2)      # ties included
    got = nms_bev(torch.from_numpy(boxes).to(device), torch.from_numpy(scores).to(device), thresh)
    assert got.cpu().tolist() == greedy_nms(boxes, scores, thresh)
    assert 8 <= len(got) < len(boxes)
    assert nms_bev(torch.zeros((0, 7)), torch.zeros(0), 0.5).numel() == 0


def test_corners_and_points_in_boxes():
    box = np.array([[1.0, 2.0, 0.5, 4.0, 2.0, 1.0, np.pi / 2]])
    corners = bev_corners(torch.from_numpy(box))[0].numpy()
    assert sorted(map(tuple, corners.round(9).tolist())) == [(0.0, 0.0), (0.0, 4.0), (2.0, 0.0), (2.0, 4.0)]
    pts = np.array([[1, 2, 0.5], [1, 3.99, 0.5], [1.99, 2, 0.5], [2.01, 2, 0.5], [1, 2, 1.01], [1, 4, 0]])
    assert points_in_boxes(pts, box)[0].tolist() == [True, True, True, False, False, True]
    assert points_in_boxes(torch.from_numpy(pts), torch.from_numpy(box)).dtype == torch.bool
