"""ERA5 prepare throughput against a plain read of the same raw store, in one process, at two sizes,
and the same prepare on Dask with a LocalCluster of 2 workers.

    python benchmarks/era5_prepare.py [--repeats 3] [--days 30 120]
    → benchmarks/results/era5_prepare.json

Each raw store is generated here (the default profile's synthetic source, `--days` long) so the figures
do not depend on what `dvc repro` left behind. The baseline is the fastest plain read of the store
(xarray without Dask; the Dask read is listed too). Goal (issue 4): prepare ≥ 0.7× the raw-read
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

GOAL = 0.7


def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(days: int, repeats: int, tmp: Path, client_for) -> dict:
    import xarray as xr

    from tasks import era5, era5_prepare
    from tasks.common import load_params

    download_cfg = dict(load_params(section="era5")["default"], n_days=days)
    prepare_cfg = load_params(section="era5_prepare")["default"]
    raw = tmp / f"raw-{days}d.zarr"
    era5.download(download_cfg, raw)
    n_bytes = xr.open_zarr(raw, consolidated=False).nbytes  # decoded in-memory size

    def prepare(**over) -> None:
        out = tmp / "prepared"
        era5_prepare.prepare(raw, out, dict(prepare_cfg, **over))
        shutil.rmtree(out)

    variants = {
        "raw read": lambda: xr.open_zarr(raw, consolidated=False, chunks=None).load(),
        "raw read (dask)": lambda: xr.open_zarr(raw, consolidated=False).load(),
        "prepare": prepare,
        "prepare (dask 2 workers)": lambda: prepare(dask=True),
    }
    prepare()  # warm-up: imports (Great Expectations), first use of the codecs
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            with client_for(name):  # the Dask variant computes on the cluster
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    base = statistics.median(times["raw read"])
    rows = {name: {"median_s": statistics.median(ts), "runs_s": ts,
                   "mb_per_s": n_bytes / 1e6 / statistics.median(ts),
                   "throughput_vs_raw_read": base / statistics.median(ts)} for name, ts in times.items()}
    return {"days": days, "raw_store_bytes_on_disk": store_bytes(raw), "raw_bytes_in_memory": n_bytes,
            "grid": f"{download_cfg['synthetic']['grid_deg']} deg -> {prepare_cfg['grid_deg']} deg",
            "variants": rows, "meets_goal": rows["prepare"]["throughput_vs_raw_read"] >= GOAL}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--days", type=int, nargs="+", default=[30, 120])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "era5_prepare.json"))
    args = ap.parse_args()

    import contextlib

    from dask.distributed import Client, LocalCluster

    from tasks.common import write_json

    tmp = Path(tempfile.mkdtemp(prefix="bench-era5-"))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        def client_for(name: str):
            return Client(cluster) if "workers" in name else contextlib.nullcontext()
        sizes = [measure(days, args.repeats, tmp, client_for) for days in args.days]
    shutil.rmtree(tmp, ignore_errors=True)
    result = {"goal_ratio": GOAL, "baseline": "raw read: xarray.open_zarr(chunks=None).load()",
              "cpus": os.cpu_count(), "sizes": sizes}
    write_json(args.out, result)

    print(f"{'days':>5} {'MB':>5}  {'variant':<26}{'median s':>10}{'MB/s':>9}{'vs raw read':>13}")
    for size in sizes:
        for name, r in size["variants"].items():
            print(f"{size['days']:>5} {size['raw_bytes_in_memory'] / 1e6:>5.0f}  {name:<26}{r['median_s']:>10.2f}"
                  f"{r['mb_per_s']:>9.1f}{r['throughput_vs_raw_read']:>12.2f}x")
    verdicts = ", ".join(f"{s['days']} d {'met' if s['meets_goal'] else 'NOT met'}" for s in sizes)
    print(f"goal prepare >= {GOAL}x raw read: {verdicts}; wrote {args.out}")


if __name__ == "__main__":
    main()
