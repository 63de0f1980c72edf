"""The point-cloud stages (issue 13): `scans` (ray-cast KITTI scenes, or real frames listed) and
`voxelize` (hard voxels + boxes, validated)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import shared_file
from models.voxelize import VoxelGrid, hard_voxelize, voxel_features
from tasks.kinds.detection3d.boxes import points_in_boxes
from tasks.kinds.detection3d.io import (kitti_boxes_to_lidar, read_kitti_calib, read_kitti_frame,
                                        read_kitti_labels)
from tasks.kinds.detection3d.schema import load_voxels, read_frame
from tasks.platform.common import StageError
from tasks.stages import scans, voxelize

GENERATE = {"n_scenes": 6, "split": {"val": 0.2, "test": 0.2}, "beams": 64, "elevation_deg": [2.0, -24.8],
            "azimuth_step_deg": 1.0, "sensor_height": 1.73, "max_range": 80.0, "range_noise": 0.02,
            "dropout": 0.05, "objects": {"Car": [3, 8], "Pedestrian": [1, 4], "Cyclist": [1, 3]},
            "placement_range": [5.0, 40.0], "half_fov_deg": 38.0, "min_points": 5, "seed": 3}
VOXELIZE = {"point_range": [0, -40, -3, 70.4, 40, 1], "voxel_size": [0.4, 0.4, 0.4], "max_points": 5,
            "max_voxels": 12000, "features": "mean"}


def write_params(work: Path, generate=GENERATE, voxel=VOXELIZE) -> None:
    params = {"pointcloud_profiles": ["t"], "scans": {"t": {"source": "generate", "generate": generate}},
              "voxelize": {"t": voxel}}
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    work = tmp_path_factory.mktemp("scans")
    write_params(work)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        manifest = scans.build("t", "scans")
        voxelize.build("t", "scans", "voxels")
    return work, manifest


@pytest.fixture(scope="module")
def kitti_calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(scans.CALIB_TEXT)
    return read_kitti_calib(path)


# ---------------------------------------------------------------------------------------------------
# the ray caster against a per-ray, per-box loop

def brute_force(origin, d, boxes, sensor_height, max_range):
    """First hit of one ray: a Python loop over the boxes (rotation matrices, slab by slab) and the plane."""
    best_t, best = math.inf, -2
    if d[2] < 0:
        best_t, best = -sensor_height / d[2], -1
    for k, b in enumerate(boxes):
        c, s = math.cos(b[6]), math.sin(b[6])
        rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])          # box -> world
        o_l, d_l = rot.T @ (np.asarray(origin) - b[:3]), rot.T @ d
        lo, hi = -math.inf, math.inf
        for axis in range(3):
            half = b[3 + axis] / 2
            if abs(d_l[axis]) < 1e-15:
                if abs(o_l[axis]) > half:
                    lo, hi = math.inf, -math.inf
                continue
            t1, t2 = (-half - o_l[axis]) / d_l[axis], (half - o_l[axis]) / d_l[axis]
            lo, hi = max(lo, min(t1, t2)), min(hi, max(t1, t2))
        if lo <= hi and lo > 0 and lo < best_t:
            best_t, best = lo, k
    return (best_t, best) if best_t <= max_range else (math.inf, -2)


def test_ray_caster_matches_a_brute_force_reference():
    rng = np.random.default_rng(0)
    cfg = dict(GENERATE, objects={"Car": [6, 6], "Pedestrian": [3, 3], "Cyclist": [2, 2]})
    boxes, _ = scans.place_objects(cfg, rng)
    random_dirs = scans.beam_directions(64, (2.0, -24.8), 7.3)[rng.choice(64 * 50, 150, replace=False)]
    aimed = boxes[:, :3] + rng.uniform(-0.3, 0.3, (len(boxes), 3)) * boxes[:, 3:6]   # rays at each box
    aimed = aimed / np.linalg.norm(aimed, axis=1, keepdims=True)
    dirs = np.concatenate([random_dirs, aimed, [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
    t, hit, _ = scans.cast_rays(dirs, boxes, 1.73, 80.0)
    hit_boxes = 0
    for i, d in enumerate(dirs):
        ref_t, ref_hit = brute_force((0, 0, 0), d, boxes, 1.73, 80.0)
        assert hit[i] == ref_hit, i
        assert t[i] == pytest.approx(ref_t, rel=1e-9, abs=1e-9) if math.isfinite(ref_t) else not math.isfinite(t[i])
        hit_boxes += ref_hit >= 0
    assert hit_boxes >= len(boxes) // 2          # the reference really exercised the boxes


def test_a_box_fully_behind_another_gets_no_points():
    wall = [8.0, 0.0, -1.73 + 1.5, 1.0, 6.0, 3.0, 0.1]             # tall, wide, near
    hidden = [20.0, 0.3, -1.73 + 0.75, 0.8, 0.6, 1.5, 0.7]         # small, behind it
    beside = [20.0, 12.0, -1.73 + 0.75, 0.8, 0.6, 1.5, 0.7]        # in the open at the same range
    boxes = np.array([wall, hidden, beside])
    dirs = scans.beam_directions(64, (2.0, -24.8), 0.2)
    t, hit, t_box = scans.cast_rays(dirs, boxes, 1.73, 80.0)
    assert np.isfinite(t_box[:, 1]).sum() > 0               # rays do cross the hidden box ...
    assert (hit == 1).sum() == 0                            # ... but none reaches it first
    assert (hit == 2).sum() > 5 and (hit == 0).sum() > 50
    assert scans.occlusion_level(t_box, hit, 80.0).tolist() == [0, 2, 0]
    points = dirs[np.isfinite(t)] * t[np.isfinite(t)][:, None]
    assert points_in_boxes(points, boxes[1:2]).sum() == 0


# ---------------------------------------------------------------------------------------------------
# labels

def test_labels_read_back_as_the_generated_boxes(tmp_path, kitti_calib):
    rng = np.random.default_rng(5)
    boxes, names = scans.place_objects(GENERATE, rng)
    assert len(boxes) >= 5
    label = tmp_path / "label.txt"
    label.write_text("".join(line + "\n" for line in scans.label_lines(boxes, names, np.zeros(len(boxes)),
                                                                         kitti_calib)))
    labels = read_kitti_labels(label)
    back = kitti_boxes_to_lidar(labels, kitti_calib)
    assert back.names == names
    np.testing.assert_allclose(back.boxes, boxes, atol=1e-5, rtol=0)
    # the 2D boxes are inside the image and the camera sees the objects in front of it
    w, h = scans.IMAGE_SIZE
    assert (labels.bbox[:, 0] < labels.bbox[:, 2]).all() and (labels.bbox[:, 2] <= w - 1).all()
    assert (labels.bbox[:, 1] < labels.bbox[:, 3]).all() and (labels.bbox[:, 3] <= h - 1).all()
    assert (labels.location[:, 2] > 0).all()


def test_generated_frames_are_kitti_and_every_label_has_its_points(generated):
    work, manifest = generated
    root = work / "scans" / manifest["root"]
    assert len(manifest["frames"]) == GENERATE["n_scenes"]
    splits = {s: (work / "scans/ImageSets" / f"{s}.txt").read_text().split() for s in scans.SPLITS}
    assert sorted(sum(splits.values(), [])) == [f["frame"] for f in manifest["frames"]]
    n_boxes = 0
    for entry in manifest["frames"]:
        f = read_kitti_frame(root, entry["frame"])
        assert 10_000 < len(f.points) < 40_000 and f.points.dtype == np.float32
        assert len(f.boxes) == entry["objects"]
        inside = points_in_boxes(f.points, f.boxes.boxes).sum(1)
        assert (inside >= GENERATE["min_points"]).all(), (entry["frame"], inside)
        assert set(f.boxes.names) <= set(scans.CLASSES)
        assert set(f.labels.occluded.tolist()) <= {0, 1, 2}
        n_boxes += len(f.boxes)
        # the ground is where the sensor height says (points far from every box)
        free = ~points_in_boxes(f.points, f.boxes.boxes * [1, 1, 1, 1.5, 1.5, 1.5, 1]).any(0)
        assert np.median(f.points[free, 2]) == pytest.approx(-1.73, abs=0.05)
    assert n_boxes >= 3 * GENERATE["n_scenes"]


def test_the_generator_is_deterministic(generated, tmp_path, monkeypatch):
    work, _ = generated
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    scans.build("t", "again")
    for sub in ("velodyne/000004.bin", "label_2/000004.txt"):
        assert (tmp_path / "again/training" / sub).read_bytes() == (work / "scans/training" / sub).read_bytes()


# ---------------------------------------------------------------------------------------------------
# voxelize

def test_voxelize_output_equals_hard_voxelize_on_the_frame(generated):
    work, manifest = generated
    summary, frames = load_voxels(work / "voxels")
    grid = VoxelGrid(tuple(VOXELIZE["voxel_size"]), tuple(VOXELIZE["point_range"]))
    assert summary["grid"]["shape_zyx"] == list(grid.shape_zyx)
    assert [f.frame for f in frames] == [e["frame"] for e in manifest["frames"]]
    for vf in frames:
        f = read_kitti_frame(work / "scans/training", vf.frame)
        hard = hard_voxelize(torch.from_numpy(f.points), grid, VOXELIZE["max_points"], VOXELIZE["max_voxels"])
        np.testing.assert_array_equal(vf.coords, hard.coords.numpy())
        np.testing.assert_array_equal(vf.num_points, hard.num_points.numpy())
        np.testing.assert_array_equal(vf.features, voxel_features(hard, "mean").numpy())
        np.testing.assert_array_equal(vf.boxes, f.boxes.boxes)
        assert vf.names == f.boxes.names
        assert summary["frames"][vf.frame]["voxels"] == len(vf.coords) > 0


def test_samples_profile_lists_and_voxelizes_the_real_frames(tmp_path, monkeypatch):
    root = shared_file("pointcloud/kitti/training/velodyne/000000.bin").parents[1]
    params = {"pointcloud_profiles": ["samples"],
              "scans": {"samples": {"source": "files", "files": {"root": str(root)}}},
              "voxelize": {"samples": dict(VOXELIZE, voxel_size=[0.2, 0.2, 0.2], max_voxels=40000)}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    manifest = scans.build("samples", "out/scans")
    assert [f["frame"] for f in manifest["frames"]] == [f"{i:06d}" for i in range(6)]
    assert scans.kitti_root("out/scans", manifest).resolve() == root.resolve()
    assert manifest["frames"][0]["sha256"]["velodyne"] == scans.sha256_file(root / "velodyne/000000.bin")
    summary = voxelize.build("samples", "out/scans", "out/voxels")
    assert summary["totals"]["frames"] == 6 and summary["totals"]["boxes"] >= 6
    vf = read_frame("out/voxels/frames/000003.npz")
    f = read_kitti_frame(root, "000003")
    grid = VoxelGrid((0.2, 0.2, 0.2), tuple(VOXELIZE["point_range"]))
    hard = hard_voxelize(torch.from_numpy(f.points), grid, 5, 40000)
    np.testing.assert_array_equal(vf.coords, hard.coords.numpy())
    assert vf.names == f.boxes.names and "Car" in vf.names


def test_real_frames_join_the_generated_ones_as_split_real(generated, tmp_path, monkeypatch):
    work, _ = generated
    root = shared_file("pointcloud/kitti/training/velodyne/000000.bin").parents[1]
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["voxelize"]["t"]["real_frames"] = str(root)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    summary = voxelize.build("t", work / "scans", "voxels")
    real = {k: v for k, v in summary["frames"].items() if v["split"] == "real"}
    assert sorted(real) == [f"real_{i:06d}" for i in range(6)]
    assert len(summary["frames"]) == len(real) + GENERATE["n_scenes"]   # the generated frames, as before
    vf, f = read_frame("voxels/frames/real_000001.npz"), read_kitti_frame(root, "000001")
    hard = hard_voxelize(torch.from_numpy(f.points), VoxelGrid(tuple(VOXELIZE["voxel_size"]), tuple(VOXELIZE["point_range"])),
                         VOXELIZE["max_points"], VOXELIZE["max_voxels"])
    np.testing.assert_array_equal(vf.coords, hard.coords.numpy())
    np.testing.assert_allclose(vf.boxes, f.boxes.boxes)


# ---------------------------------------------------------------------------------------------------
# atomic output

def test_a_failed_run_leaves_no_output_and_no_temporary_folder(generated, tmp_path, monkeypatch):
    import shutil
    work, _ = generated
    shutil.copytree(work / "scans", tmp_path / "scans")
    write_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    scan = tmp_path / "scans/training/velodyne/000004.bin"
    scan.write_bytes(scan.read_bytes()[:-6])                  # a partial last point
    with pytest.raises(StageError, match="not a multiple of the 16-byte point"):
        voxelize.build("t", "scans", "voxels")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "scans"]
    # a generator that fails half way leaves nothing either
    monkeypatch.setattr(scans, "render_scene", lambda *a: (_ for _ in ()).throw(StageError("x", "boom")))
    with pytest.raises(StageError, match="boom"):
        scans.build("t", "new_scans")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "scans"]
    assert json.loads((tmp_path / "scans/manifest.json").read_text())["source"] == "generate"
