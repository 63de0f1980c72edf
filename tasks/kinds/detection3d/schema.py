"""The voxel data contract: the files the `voxelize` stage writes and a 3D-detection consumer reads, and
the Great Expectations suites both sides run on them.

    <out>/frames/NNNNNN.npz   one per frame (numpy .npz, no pickled objects):
        features    (M, C) float32  one row per voxel: the mean (or first) of its kept points, x y z reflectance
        coords      (M, 3) int32    cell index z, y, x in the grid (spconv's order)
        num_points  (M,)   int32    points kept in the voxel, 1..max_points
        boxes       (K, 7) float64  LiDAR frame: x, y, z of the centre, dx, dy, dz, heading (DontCare dropped)
        names       (K,)   str      class of each box
    <out>/summary.json        {"grid": {point_range, voxel_size, grid_size (x, y, z), shape_zyx, max_points,
                               max_voxels, features}, "frames": {frame: {split, points, points_in_voxels,
                               points_kept, voxels, boxes}}, totals}
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ...platform.common import StageError, read_json
from ...platform.validation import Suite, validate_frame

FRAME_ARRAYS = ("features", "coords", "num_points", "boxes", "names")
FEATURE_COLUMNS = ["f_x", "f_y", "f_z", "f_r"]
BOX_COLUMNS = ["x", "y", "z", "dx", "dy", "dz", "heading"]
_FAR = 1e6   # any finite coordinate, metres or radians, is far inside this; NaN is null, inf is outside


@dataclass(frozen=True)
class VoxelFrame:
    frame: str
    features: np.ndarray     # (M, C) float32
    coords: np.ndarray       # (M, 3) int32 z, y, x
    num_points: np.ndarray   # (M,) int32
    boxes: np.ndarray        # (K, 7) float64
    names: list[str]


# ---------------------------------------------------------------------------------------------------
# suites

def voxels_suite(grid: dict[str, Any]) -> Suite:
    """On the voxel table (one row per voxel, all frames): coords inside the grid, 1..max_points points,
    finite features, the xyz mean inside the point range."""
    def build() -> list[Any]:
        import great_expectations as gx
        E = gx.expectations
        gz, gy, gx_ = grid["shape_zyx"]
        lo, hi = grid["point_range"][:3], grid["point_range"][3:]
        exps: list[Any] = [E.ExpectColumnValuesToBeBetween(column=c, min_value=0, max_value=g - 1)
                           for c, g in (("z", gz), ("y", gy), ("x", gx_))]
        exps += [E.ExpectColumnValuesToBeBetween(column="num_points", min_value=1, max_value=grid["max_points"])]
        for i, c in enumerate(FEATURE_COLUMNS[:3]):
            exps += [E.ExpectColumnValuesToNotBeNull(column=c),
                     E.ExpectColumnValuesToBeBetween(column=c, min_value=lo[i], max_value=hi[i])]
        exps += [E.ExpectColumnValuesToNotBeNull(column="f_r"),
                 E.ExpectColumnValuesToBeBetween(column="f_r", min_value=-_FAR, max_value=_FAR)]
        return exps
    return build


def boxes_suite() -> Suite:
    """On the box table (one row per box, all frames): finite, positive sizes, a class name."""
    def build() -> list[Any]:
        import great_expectations as gx
        E = gx.expectations
        exps: list[Any] = [E.ExpectColumnValuesToNotBeNull(column="name")]
        for c in BOX_COLUMNS:
            exps += [E.ExpectColumnValuesToNotBeNull(column=c)]
            if c.startswith("d"):
                exps += [E.ExpectColumnValuesToBeBetween(column=c, min_value=0, max_value=_FAR, strict_min=True)]
            else:
                exps += [E.ExpectColumnValuesToBeBetween(column=c, min_value=-_FAR, max_value=_FAR)]
        return exps
    return build


def voxel_table(frames: list[VoxelFrame]) -> pd.DataFrame:
    """All frames' voxels, rows labelled `frame:voxel` (what an error names)."""
    parts = []
    for f in frames:
        df = pd.DataFrame(f.features[:, :4].astype(np.float64), columns=FEATURE_COLUMNS[:f.features.shape[1]])
        df[["z", "y", "x"]] = f.coords
        df["num_points"] = f.num_points
        df.index = [f"{f.frame}:{i}" for i in range(len(df))]
        parts.append(df)
    return pd.concat(parts) if parts else pd.DataFrame(columns=FEATURE_COLUMNS + ["z", "y", "x", "num_points"])


def box_table(frames: list[VoxelFrame]) -> pd.DataFrame:
    parts = []
    for f in frames:
        df = pd.DataFrame(f.boxes, columns=BOX_COLUMNS)
        df["name"] = f.names
        df.index = [f"{f.frame}:{i}" for i in range(len(df))]
        parts.append(df)
    return pd.concat(parts) if parts else pd.DataFrame(columns=BOX_COLUMNS + ["name"])


def validate_frames(frames: list[VoxelFrame], grid: dict[str, Any], source: str) -> None:
    """Both suites over every frame at once (one GX run each: GX costs ~0.1 s a run, not a row)."""
    validate_frame(voxel_table(frames), voxels_suite(grid), source=source, name="voxels")
    boxes = box_table(frames)
    if len(boxes):
        validate_frame(boxes, boxes_suite(), source=source, name="voxel-boxes")


# ---------------------------------------------------------------------------------------------------
# writing and reading

def write_frame(path: Path, f: VoxelFrame) -> None:
    """One .npz (the caller writes into a temporary folder that is published whole)."""
    with open(path, "wb") as fh:
        np.savez(fh, features=f.features.astype(np.float32), coords=f.coords.astype(np.int32),
                 num_points=f.num_points.astype(np.int32), boxes=f.boxes.astype(np.float64),
                 names=np.array(f.names, dtype="U32").reshape(-1))


def read_frame(path: str | os.PathLike) -> VoxelFrame:
    path = Path(path)
    if not path.is_file():
        raise StageError(path, "not found (run `dvc repro voxelize`)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in FRAME_ARRAYS if k not in z.files]
            if missing:
                raise StageError(path, f"missing arrays {missing}")
            a = {k: z[k] for k in FRAME_ARRAYS}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise StageError(path, f"not a readable voxel file: {e}") from None
    m = len(a["features"])
    if a["features"].ndim != 2 or a["coords"].shape != (m, 3) or a["num_points"].shape != (m,) \
            or a["boxes"].ndim != 2 or a["boxes"].shape[1:] != (7,) or a["names"].shape != (len(a["boxes"]),):
        raise StageError(path, "inconsistent shapes: features (M, C), coords (M, 3), num_points (M,), "
                               "boxes (K, 7), names (K,)")
    return VoxelFrame(path.stem, a["features"], a["coords"], a["num_points"], a["boxes"], a["names"].tolist())


def read_summary(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / "summary.json"
    summary = read_json(path, "run `dvc repro voxelize`")
    if not isinstance(summary, dict) or not isinstance(summary.get("frames"), dict) or "grid" not in summary:
        raise StageError(path, "expected {\"grid\": {...}, \"frames\": {...}}")
    return summary


def load_voxels(folder: str | os.PathLike, validate: bool = True) -> tuple[dict[str, Any], list[VoxelFrame]]:
    """The summary and every frame it lists, validated with the stage's own suites."""
    summary = read_summary(folder)
    frames = [read_frame(Path(folder) / "frames" / f"{frame}.npz") for frame in summary["frames"]]
    if validate:
        validate_frames(frames, summary["grid"], source=str(Path(folder) / "frames"))
    return summary, frames
