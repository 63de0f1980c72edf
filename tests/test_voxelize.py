"""models/voxelize.py against a brute-force voxelizer written here as a plain Python loop (a dict of
voxel → point indices), on random clouds built to hit the edge cases and on the six real KITTI scans."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import shared_file
from models.voxelize import (CellTable, HardVoxelizer, VoxelGrid, dynamic_voxelize, hard_voxelize, point_coords,
                             scatter_features, voxel_features)

KITTI = [f"pointcloud/kitti/training/velodyne/00000{i}.bin" for i in range(6)]
SECOND = VoxelGrid((0.05, 0.05, 0.1), (0, -40, -3, 70.4, 40, 1))        # OpenPCDet's KITTI SECOND grid
PILLARS = VoxelGrid((0.16, 0.16, 4), (0, -39.68, -3, 69.12, 39.68, 1))  # PointPillars: one cell in z
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def reference(points: np.ndarray, voxel_size, point_range, max_points: int, max_voxels: int):
    """spconv's CPU rule, point by point: cells in float32, voxels in first-appearance order."""
    lo = np.asarray(point_range[:3], np.float32)
    hi = np.asarray(point_range[3:], np.float32)
    size = np.asarray(voxel_size, np.float32)
    grid = [int(math.copysign(math.floor(abs(float(g)) + 0.5), float(g))) for g in (hi - lo) / size]
    with np.errstate(invalid="ignore", over="ignore"):
        cells = np.floor((points[:, :3].astype(np.float32) - lo) / size).tolist()   # float32 arithmetic
    ids: dict[tuple[int, int, int], int] = {}
    members: list[list[int]] = []
    point_voxel = [-1] * len(points)
    for i, (cx, cy, cz) in enumerate(cells):
        if not (0 <= cx < grid[0] and 0 <= cy < grid[1] and 0 <= cz < grid[2]):   # NaN fails too
            continue
        key = (int(cz), int(cy), int(cx))
        if key not in ids:
            if len(ids) >= max_voxels:
                continue
            ids[key] = len(ids)
            members.append([])
        v = ids[key]
        point_voxel[i] = v
        if len(members[v]) < max_points:
            members[v].append(i)
    voxels = np.zeros((len(ids), max_points, points.shape[1]), np.float32)
    for v, idx in enumerate(members):
        voxels[v, :len(idx)] = points[idx]
    coords = np.array(list(ids), np.int32).reshape(-1, 3)
    num = np.array([len(m) for m in members], np.int32)
    return voxels, coords, num, np.array(point_voxel, np.int64)


def assert_same(out, ref) -> None:
    voxels, coords, num, point_voxel = ref
    assert out.coords.dtype == torch.int32 and out.num_points.dtype == torch.int32
    np.testing.assert_array_equal(out.coords.cpu().numpy(), coords)
    np.testing.assert_array_equal(out.num_points.cpu().numpy(), num)
    np.testing.assert_array_equal(out.point_voxel.cpu().numpy(), point_voxel)
    np.testing.assert_array_equal(out.voxels.cpu().numpy(), voxels)   # exact, padding zeros included


def both_paths(points: np.ndarray, grid: VoxelGrid, max_points: int, max_voxels: int, device: str = "cpu"):
    pts = torch.from_numpy(points).to(device)
    table = HardVoxelizer(grid, max_points, max_voxels)(pts)
    sort = hard_voxelize(pts, grid, max_points, max_voxels)
    return table, sort


def edge_cloud(rng: np.random.Generator, n: int = 3000) -> np.ndarray:
    """Points on a 0.5 m grid over [-2, 2) x [-1, 1) x [0, 1): exact faces (lo, inner faces and hi),
    duplicates, points just below hi, outside on every side, and NaN / inf rows."""
    faces = np.stack([rng.integers(-4, 5, n) * 0.5, rng.integers(-2, 3, n) * 0.5, rng.integers(0, 3, n) * 0.5], 1)
    inner = rng.uniform([-2.2, -1.2, -0.2], [2.2, 1.2, 1.2], (n, 3))
    below_hi = np.array([[np.nextafter(np.float32(2), np.float32(0)), 0.1, 0.1],
                         [0.1, np.nextafter(np.float32(1), np.float32(0)), 0.1]])
    bad = np.array([[np.nan, 0, 0.5], [0, np.inf, 0.5], [-np.inf, 0, 0.5], [0.1, 0.1, np.nan], [1e30, 0, 0],
                    [-1e30, 0, 0]])
    xyz = np.concatenate([faces, inner, faces[:200], below_hi, bad, inner[:50]])   # duplicates of both
    xyz = xyz[rng.permutation(len(xyz))]
    feats = rng.uniform(0, 1, (len(xyz), 2))
    return np.concatenate([xyz, feats], 1).astype(np.float32)


EDGE_GRID = VoxelGrid((0.5, 0.5, 0.5), (-2, -1, 0, 2, 1, 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_points,max_voxels", [(1, 1000), (3, 1000), (5, 7), (40, 1000), (2, 0)])
def test_edge_cases_match_the_reference(max_points, max_voxels, device):
    points = edge_cloud(np.random.default_rng(max_points * 100 + max_voxels))
    ref = reference(points, EDGE_GRID.voxel_size, EDGE_GRID.point_range, max_points, max_voxels)
    assert (0 < (ref[3] >= 0).sum() < len(points)) == (max_voxels > 0)
    for out in both_paths(points, EDGE_GRID, max_points, max_voxels, device):
        assert_same(out, ref)


def test_points_on_faces_and_at_hi():
    grid = VoxelGrid((0.5, 0.5, 0.5), (-2, -1, 0, 2, 1, 1))
    assert grid.grid_size == (8, 4, 2)
    pts = np.array([[-2, -1, 0, 1], [-1.5, -0.5, 0.5, 2], [2, 0, 0, 3], [0, 1, 0, 4], [0, 0, 1, 5],
                    [1.999, 0.999, 0.999, 6], [-2.0001, 0, 0, 7]], np.float32)
    out = HardVoxelizer(grid, 2, 10)(torch.from_numpy(pts))
    assert out.point_voxel.tolist() == [0, 1, -1, -1, -1, 2, -1]     # [lo, hi): a point at hi is out
    assert out.coords.tolist() == [[0, 0, 0], [1, 1, 1], [1, 3, 7]]   # z, y, x


def test_empty_and_all_out_of_range():
    vz = HardVoxelizer(EDGE_GRID, 4, 100)
    for pts in (torch.zeros((0, 4)), torch.full((50, 4), 9.0), torch.full((5, 4), float("nan"))):
        for out in (vz(pts), hard_voxelize(pts, EDGE_GRID, 4, 100)):
            assert out.voxels.shape == (0, 4, 4) and out.coords.shape == (0, 3) and out.num_points.shape == (0,)
            assert (out.point_voxel == -1).all() and out.point_voxel.shape == (len(pts),)
        dyn = dynamic_voxelize(pts, EDGE_GRID)
        assert dyn.coords.shape == (0, 3) and (dyn.point_voxel == -1).all()


def test_max_voxels_truncation_keeps_filling_existing_voxels():
    grid = VoxelGrid((1, 1, 1), (0, 0, 0, 4, 1, 1))
    x = [0.5, 1.5, 2.5, 0.6, 3.5, 1.6, 0.7]            # voxels 0, 1 first; later points of 0 and 1 still count
    pts = torch.tensor([[v, 0.5, 0.5] for v in x])
    out = HardVoxelizer(grid, 5, 2)(pts)
    assert out.point_voxel.tolist() == [0, 1, -1, 0, -1, 1, 0]
    assert out.num_points.tolist() == [3, 2]
    assert out.voxels[0, :3, 0].tolist() == pytest.approx([0.5, 0.6, 0.7])


def test_dense_voxels_switch_to_the_sort_path_and_still_match():
    rng = np.random.default_rng(3)
    pts = rng.uniform(0, 1, (6000, 4)).astype(np.float32)   # 8 voxels of ~750 points
    grid = VoxelGrid((0.5, 0.5, 0.5), (0, 0, 0, 1, 1, 1))
    ref = reference(pts, grid.voxel_size, grid.point_range, 32, 100)
    for out in both_paths(pts, grid, 32, 100):
        assert_same(out, ref)


@pytest.mark.parametrize("frame", range(6))
def test_kitti_scans_match_the_reference(frame):
    points = np.fromfile(shared_file(KITTI[frame]), np.float32).reshape(-1, 4)
    grid, max_points, max_voxels = (SECOND, 5, 16000) if frame % 2 == 0 else (PILLARS, 32, 12000)
    ref = reference(points, grid.voxel_size, grid.point_range, max_points, max_voxels)
    for out in both_paths(points, grid, max_points, max_voxels):
        assert_same(out, ref)
    if frame == 0:   # the test-time cap is larger than this scan's voxel count: nothing dropped
        out = HardVoxelizer(SECOND, 5, 40000)(torch.from_numpy(points))
        assert_same(out, reference(points, SECOND.voxel_size, SECOND.point_range, 5, 40000))


def test_matches_spconv_when_installed():
    spconv_utils = pytest.importorskip("spconv.pytorch.utils")
    points = torch.from_numpy(np.fromfile(shared_file(KITTI[1]), np.float32).reshape(-1, 4))
    for grid, max_points, max_voxels in ((SECOND, 5, 16000), (PILLARS, 32, 16000)):
        theirs = spconv_utils.PointToVoxel(vsize_xyz=list(grid.voxel_size), coors_range_xyz=list(grid.point_range),
                                           num_point_features=4, max_num_voxels=max_voxels,
                                           max_num_points_per_voxel=max_points).generate_voxel_with_id(points)
        ours = HardVoxelizer(grid, max_points, max_voxels)(points)
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b)


def test_the_table_survives_many_calls_and_its_refill():
    rng = np.random.default_rng(5)
    vz = HardVoxelizer(EDGE_GRID, 3, 50)
    table = vz.table("cpu")
    clouds = [edge_cloud(rng, 500) for _ in range(3)]
    for i, pts in enumerate(clouds * 2):
        if i == 4:
            table.base = 2**31 - 100                   # the next call must refill the table first
        assert_same(vz(torch.from_numpy(pts)), reference(pts, EDGE_GRID.voxel_size, EDGE_GRID.point_range, 3, 50))
    assert table.base < 10_000


@pytest.mark.parametrize("device", DEVICES)
def test_dynamic_voxelization_is_hard_voxelization_without_caps(device):
    points = edge_cloud(np.random.default_rng(11))
    pts = torch.from_numpy(points).to(device)
    hard = HardVoxelizer(EDGE_GRID, len(points), len(points))(pts)
    for dyn in (dynamic_voxelize(pts, EDGE_GRID), dynamic_voxelize(pts, EDGE_GRID, CellTable(EDGE_GRID, device))):
        assert torch.equal(dyn.coords, hard.coords)
        assert torch.equal(dyn.point_voxel, hard.point_voxel)
        assert torch.equal(dyn.num_points, hard.num_points)
    per_point = point_coords(pts, EDGE_GRID)
    inside = hard.point_voxel >= 0
    assert torch.equal(per_point[inside], hard.coords[hard.point_voxel[inside]])
    assert (per_point[~inside] == -1).all()


def test_features_mean_and_first():
    points = edge_cloud(np.random.default_rng(2))
    pts = torch.from_numpy(points)
    hard = HardVoxelizer(EDGE_GRID, 4, 1000)(pts)
    dyn = dynamic_voxelize(pts, EDGE_GRID)
    members: dict[int, list[int]] = {}
    for i, v in enumerate(hard.point_voxel.tolist()):
        if v >= 0:
            members.setdefault(v, []).append(i)
    kept_mean = np.stack([points[idx[:4]].mean(0) for _, idx in sorted(members.items())])
    all_mean = np.stack([points[idx].mean(0) for _, idx in sorted(members.items())])
    first = np.stack([points[idx[0]] for _, idx in sorted(members.items())])
    np.testing.assert_allclose(voxel_features(hard, "mean").numpy(), kept_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(voxel_features(hard, "first").numpy(), first)
    np.testing.assert_allclose(scatter_features(pts, dyn, "mean").numpy(), all_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(scatter_features(pts, dyn, "first").numpy(), first)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="hi > lo"):
        VoxelGrid((0.1, 0.1, 0.1), (0, 0, 0, 0, 1, 1))
    with pytest.raises(ValueError, match="> 0"):
        VoxelGrid((0, 0.1, 0.1), (0, 0, 0, 1, 1, 1))
    with pytest.raises(ValueError, match="float32"):
        hard_voxelize(torch.zeros((3, 4), dtype=torch.float64), EDGE_GRID, 1, 1)
    with pytest.raises(ValueError, match="x, y, z"):
        hard_voxelize(torch.zeros((3, 2)), EDGE_GRID, 1, 1)


def test_nuscenes_scan_with_five_features_matches_the_reference():
    path = shared_file("pointcloud/nuscenes/n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin")
    points = np.fromfile(path, np.float32).reshape(-1, 5)
    grid = VoxelGrid((0.1, 0.1, 0.2), (-51.2, -51.2, -5, 51.2, 51.2, 3))   # CenterPoint's nuScenes grid
    ref = reference(points, grid.voxel_size, grid.point_range, 10, 12000)
    assert len(ref[1]) == 12000                                            # the cap bites (15307 voxels)
    for out in both_paths(points, grid, 10, 12000):
        assert_same(out, ref)
