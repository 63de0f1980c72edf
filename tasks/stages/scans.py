"""DVC stage `scans`: the point-cloud set of a profile -> a KITTI-layout folder with `manifest.json`.

    python -m tasks.stages.scans --profile NAME [OUT_DIR]     # params: params.yaml › scans › NAME
                                                             # OUT_DIR default data/pointcloud/<NAME>/scans

Sources (`scans.<profile>.source`):
  generate  scenes ray-cast by a simulated 64-beam spinning LiDAR (HDL-64-like: `beams` elevations
            evenly from `elevation_deg[0]` to `[1]`, one column every `azimuth_step_deg`, the sensor
            `sensor_height` above a flat ground) against randomly placed, non-overlapping cuboid cars,
            pedestrians and cyclists with random headings. Every ray returns its *first* hit (so near
            objects occlude far ones) within `max_range`, with Gaussian range noise and random dropout.
            Written as real KITTI files: `training/velodyne/NNNNNN.bin`, `training/calib/NNNNNN.txt`
            (one fixed real calibration, KITTI 2011_09_26), `training/label_2/NNNNNN.txt` (camera frame,
            the exact inverse of io.kitti_boxes_to_lidar) and `ImageSets/{train,val,test}.txt`.
            A box with fewer than `min_points` returns inside it is not labelled.
  files     real KITTI frames under `files.root` (velodyne/, calib/, label_2/): each read back through
            tasks/kinds/detection3d/io.py, listed with its files' sha256; the files are not copied.

`manifest.json`: {"source", "root" (the KITTI `training/`-like folder, relative to the manifest's
folder), "classes", "frames": [{"frame", "split", "points", "objects", "sha256" (files only)}]}.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..kinds.detection3d.boxes import points_in_boxes
from ..kinds.detection3d.io import (KittiCalib, kitti_boxes_to_lidar, kitti_frames, read_kitti_calib,
                                    read_kitti_frame, read_kitti_labels)
from ..platform.common import StageError, atomic_dir, stage_main, read_json, write_json
from ..platform.params import ScansParams, naming_profile, pop_profile, stage_params

SPLITS = ("train", "val", "test")
CLASSES = ("Car", "Pedestrian", "Cyclist")
# l, w, h (metres): KITTI's mean sizes per class; each object is jittered by up to +-`SIZE_JITTER`
SIZES = {"Car": (3.9, 1.6, 1.56), "Pedestrian": (0.8, 0.6, 1.73), "Cyclist": (1.76, 0.6, 1.73)}
SIZE_JITTER = 0.08
REFLECTANCE = {"ground": (0.05, 0.3), "Car": (0.2, 0.6), "Pedestrian": (0.3, 0.5), "Cyclist": (0.25, 0.55)}
IMAGE_SIZE = (1242, 375)  # image_2 width, height (pixels)
# one real calibration (KITTI object training frame 000000, drive 2011_09_26), used for every scene
CALIB_TEXT = """\
P0: 7.070493000000e+02 0.000000000000e+00 6.040814000000e+02 0.000000000000e+00 0.000000000000e+00 7.070493000000e+02 1.805066000000e+02 0.000000000000e+00 0.000000000000e+00 0.000000000000e+00 1.000000000000e+00 0.000000000000e+00
P1: 7.070493000000e+02 0.000000000000e+00 6.040814000000e+02 -3.797842000000e+02 0.000000000000e+00 7.070493000000e+02 1.805066000000e+02 0.000000000000e+00 0.000000000000e+00 0.000000000000e+00 1.000000000000e+00 0.000000000000e+00
P2: 7.070493000000e+02 0.000000000000e+00 6.040814000000e+02 4.575831000000e+01 0.000000000000e+00 7.070493000000e+02 1.805066000000e+02 -3.454157000000e-01 0.000000000000e+00 0.000000000000e+00 1.000000000000e+00 4.981016000000e-03
P3: 7.070493000000e+02 0.000000000000e+00 6.040814000000e+02 -3.341081000000e+02 0.000000000000e+00 7.070493000000e+02 1.805066000000e+02 2.330660000000e+00 0.000000000000e+00 0.000000000000e+00 1.000000000000e+00 3.201153000000e-03
R0_rect: 9.999128000000e-01 1.009263000000e-02 -8.511932000000e-03 -1.012729000000e-02 9.999406000000e-01 -4.037671000000e-03 8.470675000000e-03 4.123522000000e-03 9.999556000000e-01
Tr_velo_to_cam: 6.927964000000e-03 -9.999722000000e-01 -2.757829000000e-03 -2.457729000000e-02 -1.162982000000e-03 2.749836000000e-03 -9.999955000000e-01 -6.127237000000e-02 9.999753000000e-01 6.931141000000e-03 -1.143899000000e-03 -3.321029000000e-01
Tr_imu_to_velo: 9.999976000000e-01 7.553071000000e-04 -2.035826000000e-03 -8.086759000000e-01 -7.854027000000e-04 9.998898000000e-01 -1.482298000000e-02 3.195559000000e-01 2.024406000000e-03 1.482454000000e-02 9.998881000000e-01 -7.997231000000e-01

"""


def out_dir_for(profile: str) -> str:
    return f"data/pointcloud/{profile}/scans"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def wrap_angle(a: np.ndarray) -> np.ndarray:
    """Angles to [-pi, pi)."""
    return (np.asarray(a) + np.pi) % (2 * np.pi) - np.pi


# ---------------------------------------------------------------------------------------------------
# the LiDAR

def beam_directions(beams: int, elevation_deg: tuple[float, float], azimuth_step_deg: float) -> np.ndarray:
    """(beams * columns, 3) unit ray directions, beam-major (top beam first), azimuth from -180 degrees."""
    elev = np.deg2rad(np.linspace(elevation_deg[0], elevation_deg[1], beams))
    azim = np.deg2rad(np.arange(-180.0, 180.0, azimuth_step_deg))
    ce, se = np.cos(elev)[:, None], np.sin(elev)[:, None]
    dirs = np.stack(np.broadcast_arrays(ce * np.cos(azim)[None], ce * np.sin(azim)[None], se), -1)
    return dirs.reshape(-1, 3)


def ray_box_distances(dirs: np.ndarray, boxes: np.ndarray, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """(R, K) distance along each unit ray from `origin` to where it enters each box (inf: misses, or
    the box is behind). Slab test in each box's own frame, all rays and boxes at once (float64)."""
    r, k = len(dirs), len(boxes)
    if k == 0:
        return np.full((r, 0), np.inf)
    cos, sin = np.cos(boxes[:, 6]), np.sin(boxes[:, 6])
    off = np.asarray(origin, dtype=np.float64)[None] - boxes[:, :3]          # (K, 3) origin - centre
    o_local = np.stack([off[:, 0] * cos + off[:, 1] * sin, -off[:, 0] * sin + off[:, 1] * cos, off[:, 2]], 1)
    d_local = np.stack([dirs[:, None, 0] * cos + dirs[:, None, 1] * sin,     # rotated by -heading
                        -dirs[:, None, 0] * sin + dirs[:, None, 1] * cos,
                        np.broadcast_to(dirs[:, None, 2], (r, k))], -1)       # (R, K, 3)
    d_local = np.where(np.abs(d_local) < 1e-12, 1e-12, d_local)              # parallel to a slab
    half = boxes[:, 3:6] / 2                                                  # (K, 3)
    t1 = (-half - o_local) / d_local
    t2 = (half - o_local) / d_local
    near = np.minimum(t1, t2).max(-1)
    far = np.maximum(t1, t2).min(-1)
    return np.where((near <= far) & (near > 0), near, np.inf)


def cast_rays(dirs: np.ndarray, boxes: np.ndarray, sensor_height: float,
              max_range: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First hit along each ray from the sensor (at the origin, the ground at z = -sensor_height).

    Returns the distance (R,) (inf: nothing within `max_range`), what was hit (R,) int (box index,
    -1 the ground, -2 nothing) and the box distances (R, K) of `ray_box_distances`."""
    t_box = ray_box_distances(dirs, boxes)
    with np.errstate(divide="ignore"):
        t_ground = np.where(dirs[:, 2] < 0, -sensor_height / np.where(dirs[:, 2] < 0, dirs[:, 2], -1.0), np.inf)
    t_all = np.concatenate([t_box, t_ground[:, None]], 1)                     # ground is column K
    which = t_all.argmin(1)
    t = t_all[np.arange(len(dirs)), which]
    hit = np.where(which == len(boxes), -1, which)
    missed = ~(t <= max_range)
    return np.where(missed, np.inf, t), np.where(missed, -2, hit), t_box


# ---------------------------------------------------------------------------------------------------
# scenes

def place_objects(cfg: dict[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """(K, 7) LiDAR-frame boxes on the ground, footprints apart, in the camera's view; headings as the
    KITTI reader returns them (-rotation_y - pi/2 with rotation_y in [-pi, pi))."""
    near, far = cfg["placement_range"]
    half_fov = np.deg2rad(cfg["half_fov_deg"])
    boxes, names, radii = [], [], []
    for cls in CLASSES:
        lo, hi = cfg["objects"].get(cls, [0, 0])
        for _ in range(int(rng.integers(lo, hi + 1))):
            l, w, h = (np.round(np.array(SIZES[cls]) * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER, 3), 2))
            radius = 0.5 * np.hypot(l, w) + 0.3                               # footprint circle + a gap
            for _try in range(50):
                rho, az = rng.uniform(near, far), rng.uniform(-half_fov, half_fov)
                x, y = rho * np.cos(az), rho * np.sin(az)
                if all(np.hypot(x - b[0], y - b[1]) > radius + r for b, r in zip(boxes, radii)):
                    break
            else:
                continue                                                      # no room left: fewer objects
            ry = wrap_angle(rng.uniform(-np.pi, np.pi))
            boxes.append([x, y, -cfg["sensor_height"] + h / 2, l, w, h, -ry - np.pi / 2])
            names.append(cls)
            radii.append(radius)
    return np.array(boxes, dtype=np.float64).reshape(-1, 7), names


def box_corners(boxes: np.ndarray) -> np.ndarray:
    """(K, 8, 3) corners in the LiDAR frame."""
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    local = signs[None] * boxes[:, None, 3:6] / 2
    cos, sin = np.cos(boxes[:, 6])[:, None], np.sin(boxes[:, 6])[:, None]
    x = local[..., 0] * cos - local[..., 1] * sin
    y = local[..., 0] * sin + local[..., 1] * cos
    return np.stack([x, y, local[..., 2]], -1) + boxes[:, None, :3]


def label_lines(boxes: np.ndarray, names: list[str], occluded: np.ndarray, calib: KittiCalib) -> list[str]:
    """KITTI label lines (camera frame) for LiDAR-frame boxes: the inverse of io.kitti_boxes_to_lidar."""
    lines = []
    if not len(boxes):
        return lines
    bottom = boxes[:, :3].copy()
    bottom[:, 2] -= boxes[:, 5] / 2
    loc = calib.lidar_to_rect(bottom)
    ry = wrap_angle(-boxes[:, 6] - np.pi / 2)
    alpha = wrap_angle(-np.arctan2(-boxes[:, 1], boxes[:, 0]) + ry)
    uv, _ = calib.lidar_to_image(box_corners(boxes).reshape(-1, 3))
    uv = uv.reshape(-1, 8, 2)
    w, h = IMAGE_SIZE
    x1, y1 = np.clip(uv[..., 0].min(1), 0, w - 1), np.clip(uv[..., 1].min(1), 0, h - 1)
    x2, y2 = np.clip(uv[..., 0].max(1), 0, w - 1), np.clip(uv[..., 1].max(1), 0, h - 1)
    for i, name in enumerate(names):
        lines.append(f"{name} 0.00 {int(occluded[i])} {alpha[i]:.6f} {x1[i]:.2f} {y1[i]:.2f} {x2[i]:.2f} {y2[i]:.2f} "
                     f"{boxes[i, 5]:.2f} {boxes[i, 4]:.2f} {boxes[i, 3]:.2f} "
                     f"{loc[i, 0]:.6f} {loc[i, 1]:.6f} {loc[i, 2]:.6f} {ry[i]:.6f}")
    return lines


def occlusion_level(t_box: np.ndarray, hit: np.ndarray, max_range: float) -> np.ndarray:
    """(K,) KITTI `occluded` from the fraction of the rays crossing a box that hit it first:
    0 (>= 80%), 1 partly (>= 40%), 2 largely; 3 (unknown) when no ray crosses it."""
    k = t_box.shape[1]
    crossed = (t_box <= max_range).sum(0)
    first = np.bincount(hit[hit >= 0], minlength=k)[:k]
    visible = first / np.maximum(crossed, 1)
    return np.where(crossed == 0, 3, np.where(visible >= 0.8, 0, np.where(visible >= 0.4, 1, 2)))


def render_scene(cfg: dict[str, Any], dirs: np.ndarray, rng: np.random.Generator):
    """One scene: (N, 4) float32 points, (K, 7) boxes, names, occlusion levels."""
    boxes, names = place_objects(cfg, rng)
    t, hit, t_box = cast_rays(dirs, boxes, cfg["sensor_height"], cfg["max_range"])
    keep = (hit != -2) & (rng.random(len(dirs)) >= cfg["dropout"])
    rng_noisy = t[keep] + rng.normal(0.0, cfg["range_noise"], int(keep.sum()))
    xyz = dirs[keep] * rng_noisy[:, None]
    kind = hit[keep]
    refl = np.empty(len(kind))
    lo, hi = REFLECTANCE["ground"]
    ground = kind == -1
    refl[ground] = rng.uniform(lo, hi, int(ground.sum()))
    for i, name in enumerate(names):
        on = kind == i
        lo, hi = REFLECTANCE[name]
        refl[on] = rng.uniform(lo, hi, int(on.sum()))
    points = np.concatenate([xyz, refl[:, None]], 1).astype(np.float32)
    return points, boxes, names, occlusion_level(t_box, hit, cfg["max_range"])


def split_frames(n: int, val: float, test: float, rng: np.random.Generator) -> list[str]:
    n_test, n_val = round(n * test), round(n * val)
    splits = ["test"] * n_test + ["val"] * n_val + ["train"] * (n - n_test - n_val)
    return [splits[i] for i in rng.permutation(n)]


def generate(cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    root = out / "training"
    for sub in ("velodyne", "calib", "label_2"):
        (root / sub).mkdir(parents=True)
    calib_path = root / "calib" / "calib.tmp"
    calib_path.write_text(CALIB_TEXT)
    calib = read_kitti_calib(calib_path)
    calib_path.unlink()
    rng = np.random.default_rng(int(cfg["seed"]))
    splits = split_frames(int(cfg["n_scenes"]), cfg["split"]["val"], cfg["split"]["test"], rng)
    dirs = beam_directions(int(cfg["beams"]), tuple(cfg["elevation_deg"]), float(cfg["azimuth_step_deg"]))
    frames = []
    for i, split in enumerate(splits):
        frame = f"{i:06d}"
        points, boxes, names, occluded = render_scene(cfg, dirs, rng)
        points.tofile(root / "velodyne" / f"{frame}.bin")
        (root / "calib" / f"{frame}.txt").write_text(CALIB_TEXT)
        label = root / "label_2" / f"{frame}.txt"
        lines = label_lines(boxes, names, occluded, calib)
        label.write_text("".join(line + "\n" for line in lines))
        # count the returns in the boxes as a reader will see them (the label's rounding included)
        read_back = kitti_boxes_to_lidar(read_kitti_labels(label), calib).boxes
        inside = points_in_boxes(points, read_back).sum(1) if len(read_back) else np.zeros(0, int)
        kept = [line for line, n in zip(lines, inside) if n >= cfg["min_points"]]
        if len(kept) < len(lines):
            label.write_text("".join(line + "\n" for line in kept))
        frames.append({"frame": frame, "split": split, "points": len(points), "objects": len(kept)})
    write_splits(out, frames)
    return {"source": "generate", "root": "training", "classes": list(CLASSES), "frames": frames}


def write_splits(out: Path, frames: list[dict[str, Any]]) -> None:
    (out / "ImageSets").mkdir()
    for split in SPLITS:
        ids = [f["frame"] for f in frames if f["split"] == split]
        (out / "ImageSets" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))


# ---------------------------------------------------------------------------------------------------
# files (real KITTI frames)

def list_files(cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    root = Path(cfg["root"])
    ids = cfg.get("frames") or kitti_frames(root)
    frames, classes = [], set()
    for frame in ids:
        f = read_kitti_frame(root, frame)   # every file checked by the readers
        classes |= set(f.boxes.names)
        sha = {sub: sha256_file(root / sub / f"{frame}.{ext}")
               for sub, ext in (("velodyne", "bin"), ("calib", "txt"), ("label_2", "txt"))}
        frames.append({"frame": frame, "split": cfg.get("split", "val"), "points": len(f.points),
                       "objects": len(f.boxes), "sha256": sha})
    write_splits(out, frames)
    return {"source": "files", "root": str(root), "classes": sorted(classes), "frames": frames}


# ---------------------------------------------------------------------------------------------------
# reading (voxelize)

def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / "manifest.json"
    manifest = read_json(path, "run `dvc repro scans`")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("frames"), list) \
            or not isinstance(manifest.get("root"), str):
        raise StageError(path, "expected {\"root\": ..., \"frames\": [...], ...}")
    return manifest


def kitti_root(folder: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    return Path(folder) / manifest["root"]


# ---------------------------------------------------------------------------------------------------

def build(profile: str, out_dir: str | Path) -> dict[str, Any]:
    # as written, validated; then with the schema's defaults for the keys left out
    cfg = ScansParams.model_validate(stage_params("scans", profile)).model_dump()
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        if cfg["source"] == "generate":
            manifest = generate(cfg["generate"], tmp)
        else:
            # the root is written relative to the final folder, which sits where tmp sits
            manifest = list_files(cfg["files"], tmp)
            manifest["root"] = os.path.relpath(Path(cfg["files"]["root"]).resolve(), out.resolve())
        write_json(tmp / "manifest.json", manifest)
    return manifest


def main(argv: list[str]) -> None:
    profile, rest = pop_profile(argv, required_by="scans")
    out_dir = rest[0] if rest else out_dir_for(profile)
    with naming_profile("scans", profile):
        manifest = build(profile, out_dir)
    n_obj = sum(f["objects"] for f in manifest["frames"])
    print(f"scans: wrote {out_dir} ({manifest['source']}: {len(manifest['frames'])} frames, {n_obj} objects)")


if __name__ == "__main__":
    stage_main(main)
