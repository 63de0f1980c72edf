"""Readers for LiDAR 3D detection data, checked: every problem is a one-line StageError naming the file.

    python -m tasks.kinds.detection3d.io KITTI_ROOT OUT.json [--nuscenes SCAN.pcd.bin ...]

KITTI 3D-object layout, under a root such as `training/`:
- `velodyne/NNNNNN.bin`: float32 × 4 per point (x, y, z, reflectance), Velodyne frame;
- `calib/NNNNNN.txt`: `KEY: values` lines, P0..P3 (3×4), R0_rect (3×3), Tr_velo_to_cam and
  Tr_imu_to_velo (3×4);
- `label_2/NNNNNN.txt`: 15 fields a line (16 in result files, the last a score): type, truncated,
  occluded, alpha, 2D box (x1 y1 x2 y2), dimensions h w l, location x y z of the box's *bottom centre*
  in rectified camera coordinates, rotation_y. `DontCare` lines mark regions without labels.
Boxes are moved to the LiDAR frame as OpenPCDet's `boxes3d_kitti_camera_to_lidar` does: the location
goes rectified camera → Velodyne (the inverse of R0_rect · Tr_velo_to_cam), is lifted by h/2 to the
centre, and (dx, dy, dz) = (l, w, h), heading = -rotation_y - π/2.

nuScenes: `*.pcd.bin` holds float32 × 5 per point (x, y, z, intensity, ring index). Its mmdet3d info
pickle is read only with `trusted=True`: unpickling runs whatever code the file names.

The command reads every KITTI frame under the root (and any nuScenes scans named), and writes a JSON
summary (points, boxes per class, LiDAR points inside each box): the check a dataset gets before
anything trains on it. Counted in the LiDAR frame, a box holds a few points more or fewer than the
same label counted in the camera frame (000003's car: 674 against 680): the LiDAR box is upright
about the LiDAR z axis, which the camera's y axis is not exactly.
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...platform.common import StageError, cli_main, write_json
from .boxes import points_in_boxes

KITTI_FEATURES, NUSCENES_FEATURES = 4, 5
KITTI_TYPES = ("Car", "Van", "Truck", "Pedestrian", "Person_sitting", "Cyclist", "Tram", "Misc", "DontCare")
CALIB_KEYS = {"P0": (3, 4), "P1": (3, 4), "P2": (3, 4), "P3": (3, 4), "R0_rect": (3, 3),
              "Tr_velo_to_cam": (3, 4), "Tr_imu_to_velo": (3, 4)}


# ---------------------------------------------------------------------------------------------------
# point clouds

def read_points(path: str | os.PathLike, features: int) -> np.ndarray:
    """(N, features) float32 from a flat little-endian float32 file; refuses a partial last point,
    an empty scan and NaN or ±inf anywhere."""
    path = Path(path)
    if not path.is_file():
        raise StageError(path, "not found")
    size = path.stat().st_size
    stride = 4 * features
    if size == 0:
        raise StageError(path, "empty scan: no points")
    if size % stride:
        raise StageError(path, f"size {size} bytes is not a multiple of the {stride}-byte point "
                               f"({features} float32): truncated or not this format")
    points = np.fromfile(path, dtype="<f4").reshape(-1, features)
    bad = ~np.isfinite(points)
    if bad.any():
        rows, cols = np.nonzero(bad)
        raise StageError(path, f"non-finite values (NaN or inf) in {len(np.unique(rows))} point(s), first at "
                               f"point {rows[0]} column {cols[0]}")
    return points.astype(np.float32, copy=False)


def read_kitti_points(path: str | os.PathLike) -> np.ndarray:
    """(N, 4) x, y, z, reflectance."""
    return read_points(path, KITTI_FEATURES)


def read_nuscenes_points(path: str | os.PathLike) -> np.ndarray:
    """(N, 5) x, y, z, intensity, ring index."""
    return read_points(path, NUSCENES_FEATURES)


# ---------------------------------------------------------------------------------------------------
# KITTI calibration

@dataclass(frozen=True)
class KittiCalib:
    P0: np.ndarray
    P1: np.ndarray
    P2: np.ndarray              # the left colour camera (image_2)
    P3: np.ndarray
    R0_rect: np.ndarray         # (3, 3) reference camera → rectified
    Tr_velo_to_cam: np.ndarray  # (3, 4) Velodyne → reference camera
    Tr_imu_to_velo: np.ndarray

    def velo_to_rect(self) -> np.ndarray:
        """(4, 4) homogeneous Velodyne → rectified camera: R0_rect · Tr_velo_to_cam."""
        r0, v2c = np.eye(4), np.eye(4)
        r0[:3, :3], v2c[:3] = self.R0_rect, self.Tr_velo_to_cam
        return r0 @ v2c

    def rect_to_lidar(self, pts: np.ndarray) -> np.ndarray:
        """(N, 3) rectified camera → Velodyne (float64)."""
        hom = np.concatenate([pts, np.ones((len(pts), 1))], 1)
        return (np.linalg.inv(self.velo_to_rect()) @ hom.T).T[:, :3]

    def lidar_to_rect(self, pts: np.ndarray) -> np.ndarray:
        hom = np.concatenate([pts[:, :3], np.ones((len(pts), 1))], 1)
        return (self.velo_to_rect() @ hom.T).T[:, :3]

    def lidar_to_image(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pixel (u, v) in image_2 and depth of each point (depth <= 0: behind the camera)."""
        rect = self.lidar_to_rect(pts)
        uvw = (self.P2 @ np.concatenate([rect, np.ones((len(rect), 1))], 1).T).T
        depth = uvw[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            return uvw[:, :2] / depth[:, None], depth


def read_kitti_calib(path: str | os.PathLike) -> KittiCalib:
    path = Path(path)
    if not path.is_file():
        raise StageError(path, "not found")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise StageError(path, "not a text calibration file") from None
    found: dict[str, np.ndarray] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, values = line.partition(":")
        key = key.strip()
        if not sep:
            raise StageError(path, f"line {n}: expected `KEY: values`, found {line.strip()[:40]!r}")
        if key in found:
            raise StageError(path, f"line {n}: {key} given twice")
        if key not in CALIB_KEYS:
            continue  # other keys (R_rect_xx, …) are not needed here
        shape = CALIB_KEYS[key]
        fields = values.split()
        if len(fields) != shape[0] * shape[1]:
            raise StageError(path, f"line {n}: {key}: expected {shape[0] * shape[1]} values, "
                                   f"found {len(fields)}")
        try:
            matrix = np.array([float(v) for v in fields]).reshape(shape)
        except ValueError:
            bad = next(v for v in fields if not _is_float(v))
            raise StageError(path, f"line {n}: {key}: not a number: {bad!r}") from None
        if not np.isfinite(matrix).all():
            raise StageError(path, f"line {n}: {key}: non-finite value")
        found[key] = matrix
    missing = [k for k in CALIB_KEYS if k not in found]
    if missing:
        raise StageError(path, f"missing {', '.join(missing)}")
    calib = KittiCalib(**found)
    if abs(np.linalg.det(calib.velo_to_rect())) < 1e-6:
        raise StageError(path, "R0_rect · Tr_velo_to_cam is singular: not a calibration")
    return calib


def _is_float(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------
# KITTI labels and boxes

@dataclass(frozen=True)
class KittiLabels:
    """The label file as written, one row per line (DontCare included), camera frame."""
    types: list[str]
    truncated: np.ndarray     # (K,)
    occluded: np.ndarray      # (K,) int
    alpha: np.ndarray         # (K,)
    bbox: np.ndarray          # (K, 4) x1 y1 x2 y2, pixels
    dimensions: np.ndarray    # (K, 3) h, w, l, metres
    location: np.ndarray      # (K, 3) x, y, z of the bottom centre, rectified camera
    rotation_y: np.ndarray    # (K,)
    score: np.ndarray | None  # (K,) in result files


@dataclass(frozen=True)
class Boxes3D:
    """Boxes in the LiDAR frame: (K, 7) float64 x, y, z of the centre, dx, dy, dz, heading (radians,
    about z, 0 along +x), and a class name per box."""
    boxes: np.ndarray
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.boxes)


def read_kitti_labels(path: str | os.PathLike, types: tuple[str, ...] = KITTI_TYPES) -> KittiLabels:
    """Every line; an empty file is a frame without objects."""
    path = Path(path)
    if not path.is_file():
        raise StageError(path, "not found")
    try:
        lines = [line.split() for line in path.read_text().splitlines()]
    except UnicodeDecodeError:
        raise StageError(path, "not a text label file") from None
    rows, names = [], []
    n_fields = None
    for n, fields in enumerate(lines, 1):
        if not fields:
            continue
        if len(fields) not in (15, 16):
            raise StageError(path, f"line {n}: expected 15 fields (16 with a score), found {len(fields)}")
        if n_fields is not None and len(fields) != n_fields:
            raise StageError(path, f"line {n}: {len(fields)} fields, earlier lines have {n_fields}")
        n_fields = len(fields)
        if fields[0] not in types:
            raise StageError(path, f"line {n}: unknown object type {fields[0]!r} "
                                   f"(expected one of {', '.join(types)})")
        try:
            values = [float(v) for v in fields[1:]]
        except ValueError:
            bad = next(v for v in fields[1:] if not _is_float(v))
            raise StageError(path, f"line {n}: not a number: {bad!r}") from None
        if not all(math.isfinite(v) for v in values):
            raise StageError(path, f"line {n}: non-finite value")
        if fields[0] != "DontCare" and min(values[7:10]) <= 0:
            raise StageError(path, f"line {n}: {fields[0]} dimensions h w l must be > 0, got {values[7:10]}")
        names.append(fields[0])
        rows.append(values)
    a = np.array(rows, dtype=np.float64).reshape(-1, (n_fields or 15) - 1)
    return KittiLabels(types=names, truncated=a[:, 0], occluded=a[:, 1].astype(np.int64), alpha=a[:, 2],
                       bbox=a[:, 3:7], dimensions=a[:, 7:10], location=a[:, 10:13], rotation_y=a[:, 13],
                       score=a[:, 14] if n_fields == 16 else None)


def kitti_boxes_to_lidar(labels: KittiLabels, calib: KittiCalib,
                         skip: tuple[str, ...] = ("DontCare",)) -> Boxes3D:
    """Camera-frame labels → LiDAR-frame boxes (x, y, z centre, dx=l, dy=w, dz=h, heading)."""
    keep = np.array([t not in skip for t in labels.types], dtype=bool)
    h, w, l = (labels.dimensions[keep, i] for i in range(3))
    centre = calib.rect_to_lidar(labels.location[keep])
    centre[:, 2] += h / 2                       # the camera location is the bottom centre
    heading = -labels.rotation_y[keep] - np.pi / 2
    boxes = np.stack([centre[:, 0], centre[:, 1], centre[:, 2], l, w, h, heading], 1) if keep.any() \
        else np.zeros((0, 7))
    return Boxes3D(boxes, [t for t, k in zip(labels.types, keep) if k])


@dataclass(frozen=True)
class KittiFrame:
    frame: str
    points: np.ndarray        # (N, 4)
    calib: KittiCalib
    labels: KittiLabels
    boxes: Boxes3D            # LiDAR frame, DontCare dropped


def read_kitti_frame(root: str | os.PathLike, frame: str) -> KittiFrame:
    root = Path(root)
    calib = read_kitti_calib(root / "calib" / f"{frame}.txt")
    labels = read_kitti_labels(root / "label_2" / f"{frame}.txt")
    points = read_kitti_points(root / "velodyne" / f"{frame}.bin")
    return KittiFrame(frame, points, calib, labels, kitti_boxes_to_lidar(labels, calib))


def kitti_frames(root: str | os.PathLike) -> list[str]:
    """Frame ids that have a Velodyne scan, sorted."""
    folder = Path(root) / "velodyne"
    if not folder.is_dir():
        raise StageError(folder, "not found: not a KITTI root (velodyne/, calib/, label_2/)")
    frames = sorted(p.stem for p in folder.glob("*.bin"))
    if not frames:
        raise StageError(folder, "no *.bin scans")
    return frames


# ---------------------------------------------------------------------------------------------------
# nuScenes (mmdet3d info pickle)

def read_nuscenes_info(path: str | os.PathLike, *, trusted: bool = False) -> dict:
    """The mmdet3d v1.x info dict (`metainfo`, `data_list`). Unpickling can run arbitrary code, so
    this refuses unless the caller vouches for the file with `trusted=True`."""
    path = Path(path)
    if not trusted:
        raise StageError(path, "refusing to unpickle: a pickle can run code when loaded; pass trusted=True "
                               "only for a file you made or checked")
    if not path.is_file():
        raise StageError(path, "not found")
    try:
        with open(path, "rb") as fh:
            info = pickle.load(fh)  # noqa: S301  (trusted by the caller, see above)
    except Exception as e:  # noqa: BLE001  (any unpickling failure is the file's problem)
        raise StageError(path, f"not a readable info pickle: {type(e).__name__}: {e}") from None
    if not isinstance(info, dict) or not isinstance(info.get("data_list"), list):
        raise StageError(path, "not an mmdet3d v1 info dict (no `data_list` list)")
    return info


def nuscenes_boxes(info: dict, sample: int = 0) -> Boxes3D:
    """A sample's boxes in the LIDAR_TOP frame: mmdet3d's `bbox_3d` = [x, y, z, l, w, h, yaw] with
    (x, y, z) the gravity centre, so it is already (x, y, z, dx, dy, dz, heading)."""
    names = {v: k for k, v in info.get("metainfo", {}).get("categories", {}).items()}
    instances = info["data_list"][sample]["instances"]
    boxes = np.array([inst["bbox_3d"] for inst in instances], dtype=np.float64).reshape(-1, 7)
    return Boxes3D(boxes, [names.get(int(inst["bbox_label_3d"]), "ignore") for inst in instances])


# ---------------------------------------------------------------------------------------------------
# the check command

def summarise(kitti_root: str | os.PathLike, nuscenes: list[str]) -> dict:
    frames = {}
    for frame in kitti_frames(kitti_root):
        f = read_kitti_frame(kitti_root, frame)
        inside = points_in_boxes(f.points, f.boxes.boxes).sum(1)
        frames[frame] = {"points": len(f.points), "boxes": [{"type": t, "points_inside": int(c)}
                                                            for t, c in zip(f.boxes.names, inside)],
                         "dontcare": f.labels.types.count("DontCare")}
    scans = {str(p): {"points": len(read_nuscenes_points(p))} for p in nuscenes}
    return {"kitti_root": str(kitti_root), "frames": frames, "nuscenes_scans": scans}


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m tasks.kinds.detection3d.io")
    ap.add_argument("kitti_root")
    ap.add_argument("out")
    ap.add_argument("--nuscenes", action="append", default=[])
    args = ap.parse_args(argv)
    summary = summarise(args.kitti_root, args.nuscenes)
    write_json(args.out, summary)
    n_boxes = sum(len(f["boxes"]) for f in summary["frames"].values())
    print(f"detection3d: {len(summary['frames'])} KITTI frame(s), {n_boxes} box(es), "
          f"{len(summary['nuscenes_scans'])} nuScenes scan(s) checked; wrote {args.out}")


if __name__ == "__main__":
    cli_main(main)
