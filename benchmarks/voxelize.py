"""Hard voxelization throughput on the six real KITTI scans: models/voxelize.py against a brute-force
Python loop and spconv's CPU `PointToVoxel`, in one process, on one thread.

    python benchmarks/voxelize.py [--repeats 15]     → benchmarks/results/voxelize.json

Goal (issue 13): the vectorised voxelizer ≥ 1.0× spconv's CPU PointToVoxel and ≥ 50× the brute-force
reference, in points per second. Every variant voxelizes the same six scans per pass; passes are
interleaved (variant by variant, frame by frame) so that a slow spell of the shared host hits all of
them; the figure is the median pass (and, beside it, the best pass: the least disturbed by the other
processes on the 2 shared cores). Outputs are checked equal to spconv's (and the reference's) first.
One thread for everyone: spconv's CPU voxelizer is single-threaded. spconv is optional: when it does
not import, the JSON says why and the ratio to it is null.

The whole measurement runs twice: with glibc's default allocator settings, and after raising its
mmap/trim thresholds (mallopt): PyTorch's CPU allocator does not cache, so by default every call
page-faults its fresh large buffers, which spconv (buffers preallocated) does not pay.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
KITTI = REPO.parent / "shared" / "data" / "pointcloud" / "kitti" / "training" / "velodyne"

GOAL_VS_SPCONV, GOAL_VS_REFERENCE = 1.0, 50.0
CONFIGS = [  # OpenPCDet's KITTI grids: SECOND/PV-RCNN (train and test caps) and PointPillars
    {"name": "second-train", "voxel_size": (0.05, 0.05, 0.1), "point_range": (0, -40, -3, 70.4, 40, 1),
     "max_points": 5, "max_voxels": 16000},
    {"name": "second-test", "voxel_size": (0.05, 0.05, 0.1), "point_range": (0, -40, -3, 70.4, 40, 1),
     "max_points": 5, "max_voxels": 40000},
    {"name": "pointpillars", "voxel_size": (0.16, 0.16, 4), "point_range": (0, -39.68, -3, 69.12, 39.68, 1),
     "max_points": 32, "max_voxels": 16000},
]


def brute_force(points, grid, max_points: int, max_voxels: int):
    """The per-point loop (spconv's rule, as tests/test_voxelize.py spells it), on a numpy array."""
    import numpy as np
    lo = np.asarray(grid.point_range[:3], np.float32)
    size = np.asarray(grid.voxel_size, np.float32)
    gx, gy, gz = grid.grid_size
    ids: dict = {}
    members: list = []
    for p in points:
        c = np.floor((p[:3] - lo) / size)
        if not (0 <= c[0] < gx and 0 <= c[1] < gy and 0 <= c[2] < gz):
            continue
        key = (int(c[2]), int(c[1]), int(c[0]))
        if key not in ids:
            if len(ids) >= max_voxels:
                continue
            ids[key] = len(ids)
            members.append([])
        slot = members[ids[key]]
        if len(slot) < max_points:
            slot.append(p)
    voxels = np.zeros((len(ids), max_points, points.shape[1]), np.float32)
    for v, pts in enumerate(members):
        voxels[v, :len(pts)] = pts
    return voxels, np.array(list(ids), np.int32).reshape(-1, 3), np.array([len(m) for m in members], np.int32)


def load_spconv():
    try:
        import cumm
        import spconv
        from spconv.pytorch.utils import PointToVoxel
    except Exception as e:  # noqa: BLE001  (any import failure is recorded, not raised)
        return None, {"available": False, "error": f"{type(e).__name__}: {e}"}
    return PointToVoxel, {"available": True, "spconv": spconv.__version__, "cumm": cumm.__version__}


def raise_malloc_thresholds() -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def measure(cfg: dict, frames: list, repeats: int, PointToVoxel, reference_s: dict | None) -> dict:
    import numpy as np
    import torch

    from models.voxelize import HardVoxelizer, VoxelGrid, hard_voxelize

    grid = VoxelGrid(cfg["voxel_size"], cfg["point_range"])
    mp, mv = cfg["max_points"], cfg["max_voxels"]
    ours = HardVoxelizer(grid, mp, mv)
    variants = {"vectorised (HardVoxelizer, cell table)": ours,
                "vectorised (hard_voxelize, sort, no table)": lambda p: hard_voxelize(p, grid, mp, mv)}
    if PointToVoxel is not None:
        variants["spconv PointToVoxel (CPU)"] = PointToVoxel(
            vsize_xyz=list(grid.voxel_size), coors_range_xyz=list(grid.point_range), num_point_features=4,
            max_num_voxels=mv, max_num_points_per_voxel=mp)

    checks = {"equal_to_spconv": None, "equal_to_brute_force": None}
    out = [ours(p) for p in frames]
    if PointToVoxel is not None:
        theirs = [variants["spconv PointToVoxel (CPU)"].generate_voxel_with_id(p) for p in frames]
        checks["equal_to_spconv"] = all(torch.equal(a, b) for o, t in zip(out, theirs) for a, b in zip(o, t))
    if reference_s is None:  # the brute-force loop is timed once per frame (seconds each), outside the passes
        reference_s = {"runs_s": []}
        equal = True
        for p, o in zip(frames, out):
            t = time.perf_counter()
            v, c, n = brute_force(p.numpy(), grid, mp, mv)
            reference_s["runs_s"].append(time.perf_counter() - t)
            equal &= (np.array_equal(v, o.voxels.numpy()) and np.array_equal(c, o.coords.numpy())
                      and np.array_equal(n, o.num_points.numpy()))
        checks["equal_to_brute_force"] = equal

    for fn in variants.values():  # warm-up: tables allocated, first-touch faults paid
        for p in frames:
            fn(p)
    passes: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            total = 0.0
            for p in frames:
                t = time.perf_counter()
                fn(p)
                total += time.perf_counter() - t
            passes[name].append(total)

    n_points = sum(len(p) for p in frames)
    rows = {name: {"median_pass_s": statistics.median(r), "min_pass_s": min(r), "runs_s": r,
                   "points_per_s": n_points / statistics.median(r), "points_per_s_best": n_points / min(r)}
            for name, r in passes.items()}
    ref_total = sum(reference_s["runs_s"])
    rows["brute-force Python loop"] = {"median_pass_s": ref_total, "min_pass_s": ref_total, "runs_s": [ref_total],
                                       "points_per_s": n_points / ref_total, "points_per_s_best": n_points / ref_total,
                                       "per_frame_s": reference_s["runs_s"]}
    ours, sort = rows["vectorised (HardVoxelizer, cell table)"], rows["vectorised (hard_voxelize, sort, no table)"]
    theirs, brute = rows.get("spconv PointToVoxel (CPU)"), rows["brute-force Python loop"]

    def ratio(a, b, key="points_per_s"):
        return None if b is None else a[key] / b[key]

    ratios = {"vs_spconv": ratio(ours, theirs), "vs_spconv_best_pass": ratio(ours, theirs, "points_per_s_best"),
              "vs_brute_force": ratio(ours, brute), "sort_path_vs_spconv": ratio(sort, theirs)}
    return {**cfg, "grid_size_xyz": grid.grid_size, "points": n_points, "variants": rows, "ratios": ratios,
            **checks, "meets_goal": {
                "vs_spconv": None if ratios["vs_spconv"] is None else ratios["vs_spconv"] >= GOAL_VS_SPCONV,
                "vs_brute_force": ratios["vs_brute_force"] >= GOAL_VS_REFERENCE}}, reference_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "voxelize.json"))
    args = ap.parse_args()

    import numpy as np
    import torch

    from tasks.platform.common import write_json

    torch.set_num_threads(1)
    frames = [torch.from_numpy(np.fromfile(KITTI / f"00000{i}.bin", np.float32).reshape(-1, 4)) for i in range(6)]
    PointToVoxel, spconv_info = load_spconv()
    results = {}
    references: dict[str, dict] = {}
    for allocator in ("glibc default", "glibc mallopt thresholds 1 GiB"):
        if allocator != "glibc default" and not raise_malloc_thresholds():
            results[allocator] = "mallopt unavailable"
            continue
        results[allocator] = []
        for cfg in CONFIGS:
            row, references[cfg["name"]] = measure(cfg, frames, args.repeats, PointToVoxel,
                                                   references.get(cfg["name"]))
            results[allocator].append(row)

    result = {"goal": {"vs_spconv": GOAL_VS_SPCONV, "vs_brute_force": GOAL_VS_REFERENCE},
              "frames": "KITTI training 000000-000005 (shared/data/pointcloud), all six per pass",
              "threads": 1, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "spconv": spconv_info, "repeats": args.repeats, "allocators": results}
    write_json(args.out, result)

    print(f"{'allocator':<16}{'config':<14}{'variant':<44}{'Mpoints/s':>10}{'best':>7}{'ms/scan':>9}")
    for allocator, rows in results.items():
        if isinstance(rows, str):
            continue
        for r in rows:
            for name, v in r["variants"].items():
                print(f"{allocator[:15]:<16}{r['name']:<14}{name:<44}{v['points_per_s'] / 1e6:>10.2f}"
                      f"{v['points_per_s_best'] / 1e6:>7.2f}{v['median_pass_s'] / 6 * 1e3:>9.2f}")
            fmt = lambda x: "n/a" if x is None else f"{x:.2f}x"  # noqa: E731
            print(f"{'':<30}vs spconv {fmt(r['ratios']['vs_spconv'])} (best passes "
                  f"{fmt(r['ratios']['vs_spconv_best_pass'])}; goal {GOAL_VS_SPCONV}x), vs brute force "
                  f"{fmt(r['ratios']['vs_brute_force'])} (goal {GOAL_VS_REFERENCE}x); equal to spconv: "
                  f"{r['equal_to_spconv']}, to brute force: {r['equal_to_brute_force']}")
    print(f"spconv: {spconv_info}; wrote {args.out}")


if __name__ == "__main__":
    main()
