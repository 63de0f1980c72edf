"""SPS-Conv's cost claim on the sparse backbone: counted FLOPs and measured CPU latency, pruned (keep
ratio 0.5: SPSS + SPRS convs) vs unpruned (SubM + regular sparse convs), same weights, same frames.

    python benchmarks/sps_backbone.py [--repeats 5]     → benchmarks/results/sps_backbone.json

Settings, from the pipeline's to the paper's scale:
    pipeline     the detectors of `dvc repro` (models/detection3d.py defaults): widths 16-32-32 on the
                 default profile's 0.4 m grid, generated scans (data/pointcloud/default/voxels)
    kitti-0.1m   the real KITTI scans at 0.1 m (~4× the voxels), widths 16-32-64
    kitti-0.05m  SECOND's KITTI grid, 0.05 × 0.05 × 0.1 m, max 40000 voxels, widths 16-32-64 (the
                 paper's backbones are wider and deeper still)
Per setting: the backbone on each frame alone (batch 1, inference, no grad), pruned and unpruned
interleaved frame by frame, `repeats` passes; latency is the median over passes of the per-pass total,
FLOPs are counted (2 × the multiply-adds of the pairs each conv computes). Weights are random (seeded):
timing and counts do not depend on training, and the keep ratio fixes how many sites each pruned conv
keeps. One thread for both sides.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
KITTI = REPO.parent / "shared" / "data" / "pointcloud" / "kitti" / "training"
GENERATED = REPO / "data" / "pointcloud" / "default" / "voxels"

KITTI_RANGE = (0, -40, -3, 70.4, 40, 1)
SETTINGS = [
    {"name": "pipeline", "source": "generated", "widths": (16, 32, 32)},
    {"name": "kitti-0.1m", "source": "kitti", "voxel_size": (0.1, 0.1, 0.1), "max_voxels": 40000,
     "widths": (16, 32, 64)},
    {"name": "kitti-0.05m", "source": "kitti", "voxel_size": (0.05, 0.05, 0.1), "max_voxels": 40000,
     "widths": (16, 32, 64)},
]
GOAL_FLOPS, GOAL_LATENCY = 0.6, 0.7   # the claim: >= 40% fewer FLOPs, >= 30% lower latency


def generated_inputs(limit: int = 20):
    """(shape_zyx, [(features, coords)]) of the default profile's test frames."""
    import torch
    from tasks.kinds.detection3d.kind import batch_inputs
    from tasks.kinds.detection3d.schema import load_voxels
    summary, frames = load_voxels(GENERATED, validate=False)
    test = [f for f in frames if summary["frames"][f.frame]["split"] == "test"][:limit]
    inputs = [batch_inputs([f]) for f in test]
    return tuple(summary["grid"]["shape_zyx"]), [(x["features"], x["coords"].to(torch.long)) for x in inputs]


def kitti_inputs(voxel_size, max_voxels: int):
    """(shape_zyx, [(features, coords)]) of the six real scans, hard-voxelized (mean of kept points)."""
    import torch
    from models.voxelize import HardVoxelizer, VoxelGrid, voxel_features
    from tasks.kinds.detection3d.io import read_kitti_points
    grid = VoxelGrid(tuple(voxel_size), KITTI_RANGE)
    voxelizer = HardVoxelizer(grid, 5, max_voxels)
    out = []
    for path in sorted((KITTI / "velodyne").glob("*.bin")):
        hard = voxelizer(torch.from_numpy(read_kitti_points(path)))
        coords = torch.cat([torch.zeros(len(hard.coords), 1, dtype=torch.long), hard.coords.long()], 1)
        out.append((voxel_features(hard, "mean").float(), coords))
    return tuple(grid.shape_zyx), out


def measure(setting: dict, repeats: int) -> dict:
    import torch
    from models.detection3d import DetectorConfig, SparseBackbone, SparseTensor, count_macs
    shape, inputs = generated_inputs() if setting["source"] == "generated" else \
        kitti_inputs(setting["voxel_size"], setting["max_voxels"])
    backbones = {}
    for name, keep in (("unpruned", None), ("pruned", 0.5)):
        torch.manual_seed(0)
        backbones[name] = SparseBackbone(DetectorConfig(shape_zyx=shape, widths=setting["widths"],
                                                        keep_ratio=keep)).eval()
    backbones["pruned"].load_state_dict(backbones["unpruned"].state_dict())

    def run(net, f, c):
        return net(SparseTensor(f, c, shape, 1))

    flops = {k: [] for k in backbones}
    with torch.no_grad():
        for f, c in inputs:   # warm-up, and the counts
            for name, net in backbones.items():
                run(net, f, c)
                flops[name].append(2 * count_macs(net))
        passes = {k: [] for k in backbones}
        for _ in range(repeats):
            for name in backbones:
                passes[name].append(0.0)
            for f, c in inputs:
                for name, net in backbones.items():
                    t0 = time.perf_counter()
                    run(net, f, c)
                    passes[name][-1] += time.perf_counter() - t0
    n = len(inputs)
    row = {"setting": setting["name"], "frames": n, "widths": list(setting["widths"]), "shape_zyx": list(shape),
           "voxels_per_frame": statistics.fmean(len(c) for _, c in inputs)}
    for name in backbones:
        row[f"{name}_gflops"] = statistics.fmean(flops[name]) / 1e9
        row[f"{name}_ms"] = statistics.median(passes[name]) / n * 1e3
    row["flops_ratio"] = row["pruned_gflops"] / row["unpruned_gflops"]
    row["latency_ratio"] = row["pruned_ms"] / row["unpruned_ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sps_backbone.json"))
    args = ap.parse_args()
    import torch
    from tasks.platform.common import write_json
    torch.set_num_threads(1)
    rows = []
    for setting in SETTINGS:
        if setting["source"] == "kitti" and not KITTI.is_dir():
            print(f"{setting['name']}: skipped, {KITTI} is missing")
            continue
        if setting["source"] == "generated" and not GENERATED.is_dir():
            print(f"{setting['name']}: skipped, run `dvc repro voxelize@default`")
            continue
        rows.append(measure(setting, args.repeats))
    print(f"{'setting':<12} {'voxels':>7} {'GFLOPs unpr':>11} {'pruned':>7} {'ratio':>6} "
          f"{'ms unpr':>8} {'pruned':>7} {'ratio':>6}")
    for r in rows:
        print(f"{r['setting']:<12} {r['voxels_per_frame']:>7.0f} {r['unpruned_gflops']:>11.3f} {r['pruned_gflops']:>7.3f} "
              f"{r['flops_ratio']:>6.2f} {r['unpruned_ms']:>8.1f} {r['pruned_ms']:>7.1f} {r['latency_ratio']:>6.2f}")
    result = {"benchmark": "sps_backbone", "torch": torch.__version__, "machine": platform.machine(),
              "threads": 1, "repeats": args.repeats, "goals": {"flops_ratio": f"<= {GOAL_FLOPS}",
                                                              "latency_ratio": f"<= {GOAL_LATENCY}"},
              "rows": rows}
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
