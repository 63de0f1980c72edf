"""ERA5 prepare throughput against a plain read of the same raw store, in one process, and the same
prepare with a Dask LocalCluster of 2 workers.

    python benchmarks/era5_prepare.py [--repeats 3] [--days 30]
    → benchmarks/results/era5_prepare.json

The raw store is generated here (the default profile's synthetic source, `--days` long) so the
figures do not depend on what `dvc repro` left behind. Goal (issue 4): prepare ≥ 0.7× the raw-read
throughput. Great Expectations' import (~3 s) is paid once in a warm-up and excluded.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.chdir(REPO)


def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "era5_prepare.json"))
    args = ap.parse_args()

    import xarray as xr

    from tasks import era5, era5_prepare
    from tasks.common import load_params, write_json

    download_cfg = dict(load_params(section="era5")["default"], n_days=args.days)
    prepare_cfg = load_params(section="era5_prepare")["default"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-era5-"))
    raw = tmp / "raw.zarr"
    era5.download(download_cfg, raw)
    n_bytes = sum(ds.nbytes for ds in [xr.open_zarr(raw, consolidated=False)])  # decoded in-memory size

    def raw_read() -> None:
        xr.open_zarr(raw, consolidated=False).load()

    def prepare() -> None:
        out = tmp / "prepared"
        era5_prepare.prepare(raw, out, prepare_cfg)
        shutil.rmtree(out)

    prepare()  # warm-up: imports (Great Expectations), numba/dask first use
    times: dict[str, list[float]] = {"raw read": [], "prepare": [], "prepare (dask 2 workers)": []}
    from dask.distributed import Client, LocalCluster
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        for _ in range(args.repeats):
            for name, fn in (("raw read", raw_read), ("prepare", prepare)):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
            with Client(cluster):  # dask-backed arrays now compute on the cluster
                t = time.perf_counter()
                prepare()
                times["prepare (dask 2 workers)"].append(time.perf_counter() - t)

    base = statistics.median(times["raw read"])
    rows = {name: {"median_s": statistics.median(ts), "runs_s": ts,
                   "mb_per_s": n_bytes / 1e6 / statistics.median(ts),
                   "throughput_vs_raw_read": base / statistics.median(ts)} for name, ts in times.items()}
    result = {"raw_store_bytes_on_disk": store_bytes(raw), "raw_bytes_in_memory": n_bytes, "days": args.days,
              "grid": f"{download_cfg['synthetic']['grid_deg']} deg -> {prepare_cfg['grid_deg']} deg",
              "variants": rows, "goal_ratio": 0.7,
              "meets_goal": rows["prepare"]["throughput_vs_raw_read"] >= 0.7, "cpus": os.cpu_count()}
    write_json(args.out, result)
    shutil.rmtree(tmp, ignore_errors=True)

    print(f"{'variant':<26}{'median s':>10}{'MB/s':>9}{'vs raw read':>13}")
    for name, r in rows.items():
        print(f"{name:<26}{r['median_s']:>10.2f}{r['mb_per_s']:>9.1f}{r['throughput_vs_raw_read']:>12.2f}x")
    print(f"{n_bytes / 1e6:.0f} MB decoded; goal prepare >= 0.7x raw read: "
          f"{'met' if result['meets_goal'] else 'NOT met'}; wrote {args.out}")


if __name__ == "__main__":
    main()
