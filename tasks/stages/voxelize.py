"""DVC stage `voxelize`: every scan of a `scans` folder -> hard voxels + LiDAR-frame boxes, one file a frame.

    python -m tasks.stages.voxelize --profile NAME SCANS_DIR OUT_DIR    # params: params.yaml › voxelize › NAME

Each frame is read through tasks/kinds/detection3d/io.py (a real frame is first checked against the
sha256 the scans stage listed), hard-voxelized with models/voxelize.py (`point_range`, `voxel_size`,
`max_points`, `max_voxels`; one feature row per voxel, the mean of its kept points) and written as
`frames/NNNNNN.npz` with its boxes; `summary.json` counts frames, voxels and points. Every frame is
validated with Great Expectations before the output folder appears (the contract, its suites and its
reader: tasks/kinds/detection3d/schema.py). With `real_frames` (a KITTI `training` folder), those frames
are voxelized into the same folder as `real_NNNNNN`, split `real`: the detectors are scored on them
beside the test split, never trained on them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from models.voxelize import HardVoxelizer, VoxelGrid, voxel_features

from ..kinds.detection3d.io import KittiFrame, kitti_frames, read_kitti_frame
from ..kinds.detection3d.schema import VoxelFrame, validate_frames, write_frame
from ..platform.common import StageError, atomic_dir, stage_main, write_json
from ..platform.params import VoxelizeParams, naming_profile, pop_profile, stage_params
from .scans import kitti_root, read_manifest, sha256_file


def make_grid(cfg: dict[str, Any]) -> dict[str, Any]:
    grid = VoxelGrid(tuple(cfg["voxel_size"]), tuple(cfg["point_range"]))
    return {"point_range": list(grid.point_range), "voxel_size": list(grid.voxel_size),
            "grid_size": list(grid.grid_size), "shape_zyx": list(grid.shape_zyx),
            "max_points": int(cfg["max_points"]), "max_voxels": int(cfg["max_voxels"]),
            "features": cfg["features"], "_grid": grid}


def voxelize_frame(points: torch.Tensor, voxelizer: HardVoxelizer, mode: str):
    hard = voxelizer(points)
    return hard, voxel_features(hard, mode)


def check_sha(root: Path, entry: dict[str, Any]) -> None:
    for sub, digest in (entry.get("sha256") or {}).items():
        path = root / sub / f"{entry['frame']}.{'bin' if sub == 'velodyne' else 'txt'}"
        if path.is_file() and sha256_file(path) != digest:
            raise StageError(path, "changed since the scans stage listed it (sha256 differs): "
                                   "run `dvc repro scans`")


def build(profile: str, scans_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    cfg = VoxelizeParams.model_validate(stage_params("voxelize", profile)).model_dump()
    manifest = read_manifest(scans_dir)
    root = kitti_root(scans_dir, manifest)
    grid = make_grid(cfg)
    voxelizer = HardVoxelizer(grid.pop("_grid"), grid["max_points"], grid["max_voxels"])
    summary: dict[str, Any] = {"scans": str(scans_dir), "grid": grid, "frames": {}}
    frames = []

    def add(f: KittiFrame, name: str, split: str | None, folder: Path) -> None:
        hard, feats = voxelize_frame(torch.from_numpy(f.points), voxelizer, grid["features"])
        vf = VoxelFrame(name, feats.numpy(), hard.coords.numpy(), hard.num_points.numpy(),
                        f.boxes.boxes, list(f.boxes.names))
        write_frame(folder / f"{name}.npz", vf)
        frames.append(vf)
        summary["frames"][name] = {
            "split": split, "points": len(f.points), "points_in_voxels": int((hard.point_voxel >= 0).sum()),
            "points_kept": int(hard.num_points.sum()), "voxels": len(vf.coords), "boxes": len(vf.boxes)}

    with atomic_dir(out_dir) as tmp:
        (tmp / "frames").mkdir()
        for entry in manifest["frames"]:
            check_sha(root, entry)
            add(read_kitti_frame(root, entry["frame"]), entry["frame"], entry.get("split"), tmp / "frames")
        if cfg["real_frames"]:
            real = Path(cfg["real_frames"])
            if not real.is_dir():
                raise StageError(real, f"not found (params.yaml: voxelize.{profile}.real_frames)")
            for frame in kitti_frames(real):
                add(read_kitti_frame(real, frame), f"real_{frame}", "real", tmp / "frames")
            summary["real_frames"] = str(real)
        validate_frames(frames, grid, source=str(Path(out_dir) / "frames"))
        per = summary["frames"].values()
        summary["totals"] = {"frames": len(frames), "voxels": sum(v["voxels"] for v in per),
                             "points": sum(v["points"] for v in per),
                             "points_kept": sum(v["points_kept"] for v in per),
                             "boxes": sum(v["boxes"] for v in per)}
        write_json(tmp / "summary.json", summary)
    return summary


def main(argv: list[str]) -> None:
    profile, rest = pop_profile(argv, required_by="voxelize")
    if len(rest) != 2:
        raise StageError("command line", "usage: python -m tasks.stages.voxelize --profile NAME SCANS_DIR OUT_DIR")
    with naming_profile("voxelize", profile):
        summary = build(profile, rest[0], rest[1])
    t = summary["totals"]
    print(f"voxelize: wrote {rest[1]} ({t['frames']} frames, {t['voxels']} voxels, "
          f"{t['points_kept']} of {t['points']} points kept)")


if __name__ == "__main__":
    stage_main(main)
