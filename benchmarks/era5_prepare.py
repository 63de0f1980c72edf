"""ERA5 prepare throughput against a plain read of the same raw store, in process and on Dask, at
several sizes, and where the Dask paths break even with the in-process one.

    python benchmarks/era5_prepare.py [--repeats 3] [--days 30 120 240 480]
    → benchmarks/results/era5_prepare.json

Each raw store is generated here (the default profile's synthetic source, `--days` long) so the figures
do not depend on what `dvc repro` left behind. The baseline is the fastest plain read of the store
(xarray without Dask; the Dask read is listed too). Goal (issue 4): prepare ≥ 0.7× the raw-read
throughput. Great Expectations' import (~3 s) is paid once in a warm-up and excluded.

Variants of prepare (the stores they write are byte-identical: tests/test_dask_prepare.py):
  prepare                       in process (`dask: false`, what `auto` picks below `dask_above_mb`)
  prepare (dask, threads)       `dask: true`, no cluster: the Dask graph on this process's threads
  prepare (local:2)             `dask: true, cluster: local:2`: the stage starts 2 worker processes,
                                runs, closes them; the start (~1-3 s here) is in the time
  prepare (2-worker scheduler)  `dask: true, cluster: tcp://...`: a scheduler with 2 worker processes
                                already running (as `dask scheduler` + `dask worker` would be); the
                                stage only connects. Measured after the other variants, with its
                                cluster alive only then: idle workers slow the in-process variants.

CPU seconds: this process (all threads), plus the worker processes for the cluster variants (their
rusage: children for local:2, `client.run` for the scheduler). Prepare's CPU time over the cores is
the least wall time any scheduling of the same work could reach, so
`ceiling_vs_raw_read_if_perfectly_parallel` says whether the goal is reachable on this machine at all
without doing less work. At the largest size, the peak resident memory of one run of each kind of
path, each in a fresh process (`peak_rss_mb`).

The machine this ran on has 2 cores, and another long job was using them (see `load_average`):
medians of interleaved repeats, but expect ±20% between runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.chdir(REPO)

GOAL = 0.7
IN_PROCESS = "prepare"
DASK_VARIANTS = ("prepare (dask, threads)", "prepare (local:2)", "prepare (2-worker scheduler)")

# the distributed path before it was restructured (this file's previous results, same machine):
# read_all loaded every variable into the client, one variable at a time, from 3600 tasks of 0.7 MB
# chunks; stats, climatology, validation and the writes then ran on the client
BEFORE = {"prepare (dask 2 workers), before": {"30": {"median_s": 2.593, "throughput_vs_raw_read": 0.064},
                                               "120": {"median_s": 6.565, "throughput_vs_raw_read": 0.080}}}
# break-evens of two earlier full runs of this script the same hour (before the final one, whose
# measurements are in the JSON): the host's other job makes single runs disagree
OTHER_RUNS = [{"prepare (dask, threads)": 425, "prepare (2-worker scheduler)": 615,
               "scheduler_speed_vs_in_process": {"755": 1.30, "1510": 0.93}},
              {"prepare (dask, threads)": 654, "prepare (2-worker scheduler)": None,
               "scheduler_speed_vs_in_process": {"755": 0.79, "1510": 0.82}}]
FINDINGS = [
    "Before, 120 days on a warm 2-worker LocalCluster: 6.8 s, of which read_all 6.2 s. The graph had 3600 "
    "tasks "
    "(512 raw chunks of 0.7 MB, ~7 tasks each through harmonise and the block mean): 1.4 s of work, but "
    "~1.4 ms of scheduler + worker CPU per task on this machine (5 s), in 8 computes, one per variable. "
    "Results to the client: 0.11 s. Then the client alone validated, summarised and wrote the regridded "
    "data (~0.8 s).",
    "Fix 1: one graph, one compute. Read each variable in blocks of whole stored chunks up to 64 MiB and "
    "regrid each block in one task (xr.map_blocks running the in-process code). Then one task per output "
    "chunk, where the block is, writes its Zarr region, reduces it to min/max per field (all the GE suites "
    "look at) and computes its partial stats and climatology. The client gets back two numbers per field "
    "and the stats. 3600 -> ~250 tasks at 120 days; 6.8 -> ~3 s.",
    "Fix 2: Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which turns off glibc's dynamic "
    "mmap threshold: every NumPy array over 128 KiB became a fresh mmap that page-faults in. The same "
    "in-process prepare took 1.5-2x the CPU inside a worker (regrid 0.17-0.32 s of thread time vs 0.08 s). "
    "Workers the stage starts run without it (tasks/platform/dask_cluster.py). ~3 -> ~2 s at 120 days.",
    "Fix 3: xarray's to_zarr(compute=False) fuses a block's upstream into its own write tasks under new "
    "names, so blocks that were also reduced were computed twice. It now only creates the stores; the "
    "per-chunk task writes the data.",
    "Left: ~0.3 s of client work before the graph runs (store metadata 0.2 s, graph 0.1 s) and GE "
    "validation (0.15 s), both paid in process too; ~1.4 ms per task; moving regridded blocks between "
    "workers to assemble output chunks. On 2 cores, two worker processes plus the client and scheduler "
    "share the CPUs the in-process path's threads already use: the cluster can only recover its "
    "overhead, not add cores. local:N also starts and stops its workers on every run: ~0.6 s start, "
    "~0.7-1.2 s of worker imports, ~0.7 s close: 1-5.5 s (mostly 3-4 s) more than the warm scheduler.",
    "Dask (threads or workers) holds blocks, not the selection: in process, peak memory grows with the "
    "data (peak_rss_mb at the largest size).",
]


def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cpu_self_and_children() -> float:
    """This process and its reaped children (local:2's workers, once the stage has closed them)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def worker_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn, runs: dict[str, list[float]], name: str, client=None) -> None:
    w = sum(client.run(worker_cpu).values()) if client else 0.0
    t, c = time.perf_counter(), cpu_self_and_children()
    fn()
    runs.setdefault(name, []).append(time.perf_counter() - t)
    w = sum(client.run(worker_cpu).values()) - w if client else 0.0
    runs.setdefault(f"{name} cpu", []).append(cpu_self_and_children() - c + w)


def measure(days: int, repeats: int, tmp: Path, with_rss: bool = False) -> dict:
    import xarray as xr
    from dask.distributed import Client

    from tasks.platform import dask_cluster
    from tasks.platform.params import stage_params
    from tasks.stages import era5_download as era5, era5_prepare

    download_cfg = dict(stage_params("era5", "default"), n_days=days)
    prepare_cfg = stage_params("era5_prepare", "default")
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
        IN_PROCESS: lambda: prepare(dask=False),
        "prepare (dask, threads)": lambda: prepare(dask=True, cluster=None),
        "prepare (local:2)": lambda: prepare(dask=True, cluster="local:2"),
    }
    os.environ.pop(dask_cluster.ENV, None)  # the variants say where they run
    for fn in variants.values():
        fn()  # warm-up: imports (Great Expectations), first use of the codecs, the page cache
    runs: dict[str, list[float]] = {}
    for _ in range(repeats):  # interleaved, so that a slow spell of the host hits every variant
        for name, fn in variants.items():
            timed(fn, runs, name)
    scheduler = "prepare (2-worker scheduler)"
    with dask_cluster._local_cluster(2) as cluster, Client(cluster, set_as_default=False) as client:
        run = lambda: prepare(dask=True, cluster=cluster.scheduler_address)
        run()  # warm-up: the workers' imports
        for _ in range(repeats):
            timed(run, runs, scheduler, client)
    kinds = {IN_PROCESS: "in-process", "prepare (dask, threads)": "threads", scheduler: "scheduler"}
    peak = {name: peak_rss_mb(raw, kind) for name, kind in kinds.items()} if with_rss else None

    base = statistics.median(runs["raw read"])
    in_process = statistics.median(runs[IN_PROCESS])
    rows = {name: {"median_s": statistics.median(runs[name]), "runs_s": runs[name],
                   "cpu_s": statistics.median(runs[f"{name} cpu"]),
                   "mb_per_s": n_bytes / 1e6 / statistics.median(runs[name]),
                   "throughput_vs_raw_read": base / statistics.median(runs[name]),
                   "speed_vs_in_process": in_process / statistics.median(runs[name])}
            for name in (*variants, scheduler)}
    # with every core busy all the time, prepare could take no less than its CPU time / cores
    ceiling = base / (rows[IN_PROCESS]["cpu_s"] / os.cpu_count())
    return {"days": days, "raw_store_bytes_on_disk": store_bytes(raw), "raw_bytes_in_memory": n_bytes,
            "selection_mb": n_bytes / 1e6,  # what `dask: auto` compares with dask_above_mb: all is selected
            "grid": f"{download_cfg['synthetic']['grid_deg']} deg -> {prepare_cfg['grid_deg']} deg",
            "load_average": os.getloadavg(),
            "variants": rows, "peak_rss_mb": peak,
            "meets_goal": rows[IN_PROCESS]["throughput_vs_raw_read"] >= GOAL,
            "ceiling_vs_raw_read_if_perfectly_parallel": ceiling}


def peak_rss_mb(raw: Path, variant: str) -> dict:
    """Peak resident memory (MB) of one prepare of `raw` in a fresh process, since the high-water mark
    cannot be reset: the process itself (after its imports: `baseline`), and its workers."""
    proc = subprocess.run([sys.executable, __file__, "--peak-rss", variant, str(raw)], capture_output=True,
                          text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _peak_rss_mb() -> float:
    """This process's resident-memory high-water mark. Not ru_maxrss: Linux carries that across exec,
    so a child started by this benchmark would report the benchmark's own peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _one_prepare_for_peak_rss(variant: str, raw: str) -> None:
    from dask.distributed import Client

    from tasks.platform import dask_cluster
    from tasks.platform.params import stage_params
    from tasks.stages import era5_prepare

    peak = _peak_rss_mb
    cfg = stage_params("era5_prepare", "default")
    out = Path(tempfile.mkdtemp(prefix="bench-rss-")) / "prepared"
    baseline, workers = peak(), []
    if variant == "scheduler":
        with dask_cluster._local_cluster(2) as cluster, Client(cluster, set_as_default=False) as client:
            era5_prepare.prepare(raw, out, dict(cfg, dask=True, cluster=cluster.scheduler_address))
            workers = list(client.run(peak).values())
    else:
        era5_prepare.prepare(raw, out, dict(cfg, dask=variant == "threads", cluster=None))
    shutil.rmtree(out.parent)
    print(json.dumps({"process": round(peak()), "baseline": round(baseline),
                      "workers": [round(w) for w in workers]}))


def break_even(sizes: list[dict], variant: str) -> dict:
    """Where `variant` becomes at least as fast as in process: the selection size (MB) interpolated
    on log size between the last measured size where it was slower and the next, or None when it
    never was (or always was) within the sizes measured."""
    points = [(s["selection_mb"], s["variants"][variant]["median_s"] / s["variants"][IN_PROCESS]["median_s"])
              for s in sizes]
    for (mb0, r0), (mb1, r1) in zip(points, points[1:]):
        if r0 > 1 >= r1:
            f = (r0 - 1) / (r0 - r1)
            return {"mb": math.exp(math.log(mb0) + f * (math.log(mb1) - math.log(mb0))),
                    "time_ratio_by_size_mb": points}
    faster = [mb for mb, r in points if r <= 1]
    note = ("faster at every size measured" if len(faster) == len(points) else
            "slower at every size measured" if not faster else "no single crossing (noise)")
    return {"mb": None, "note": note, "time_ratio_by_size_mb": points}


def threshold_notes() -> dict:
    from tasks.stages.era5_prepare import CLUSTER_ABOVE_MB, DASK_ABOVE_MB
    return {
        "dask_above_mb": DASK_ABOVE_MB, "dask_above_mb_with_cluster": CLUSTER_ABOVE_MB,
        "rule": "dask: auto prepares in process up to dask_above_mb of selected raw data; above it, on "
                "Dask: on the cluster when one is configured (params `cluster`, or "
                "DASK_SCHEDULER_ADDRESS), else on this process's threads. Unset, dask_above_mb is "
                f"{DASK_ABOVE_MB} MB without a cluster and {CLUSTER_ABOVE_MB} MB with one "
                "(tasks/stages/era5_prepare.py, use_dask).",
        "why_without_cluster": "Dask's threads break even with the in-process path at 300-650 MB over "
                               "three runs, are level above that, and hold blocks instead of the "
                               "selection.",
        "why_with_cluster": "On this 2-core machine there is no speed break-even: 2 worker processes "
                            "sharing the client's 2 cores stayed at 0.8-0.93x the in-process speed at "
                            "1.5 GB in all three runs (1.3x once at 755 MB), and local:N adds 1-5.5 s "
                            "(mostly 3-4 s) of start and stop to every run. The cluster is chosen past the "
                            "measured range, where the in-process path's memory (1.2x the selection, in "
                            "one process) starts to matter. A cluster with more cores than the client's "
                            "machine breaks even far sooner: set dask_above_mb (or dask: true) for it.",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--days", type=int, nargs="+", default=[30, 120, 240, 480])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "era5_prepare.json"))
    ap.add_argument("--summarise-only", action="store_true",
                    help="recompute the break-evens and the threshold notes of --out from its measurements")
    ap.add_argument("--peak-rss", nargs=2, metavar=("VARIANT", "RAW"), help=argparse.SUPPRESS)  # internal
    args = ap.parse_args()
    if args.peak_rss:
        _one_prepare_for_peak_rss(*args.peak_rss)
        return

    from tasks.platform.common import read_json, write_json

    if args.summarise_only:
        sizes = read_json(args.out, "run the benchmark first")["sizes"]
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bench-era5-"))
        try:
            days = sorted(args.days)
            sizes = [measure(d, args.repeats, tmp, with_rss=d == days[-1]) for d in days]
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    even = {name: break_even(sizes, name) for name in DASK_VARIANTS}
    result = {"goal_ratio": GOAL, "baseline": "raw read: xarray.open_zarr(chunks=None).load()",
              "cpus": os.cpu_count(), "sizes": sizes, "before": BEFORE, "findings": FINDINGS,
              "break_even_vs_in_process": even, "break_even_other_runs_mb": OTHER_RUNS,
              "threshold": threshold_notes()}
    write_json(args.out, result)

    print(f"{'days':>5} {'MB':>6}  {'variant':<30}{'median s':>9}{'CPU s':>7}{'MB/s':>8}{'vs raw':>8}"
          f"{'vs in-proc':>11}")
    for size in sizes:
        for name, r in size["variants"].items():
            print(f"{size['days']:>5} {size['selection_mb']:>6.0f}  {name:<30}{r['median_s']:>9.2f}"
                  f"{r['cpu_s']:>7.2f}{r['mb_per_s']:>8.1f}{r['throughput_vs_raw_read']:>7.2f}x"
                  f"{r['speed_vs_in_process']:>10.2f}x")
    for name, rss in (sizes[-1]["peak_rss_mb"] or {}).items():
        print(f"peak RSS at {sizes[-1]['days']} d, {name}: {rss['process']} MB (after imports "
              f"{rss['baseline']})" + (f", workers {rss['workers']} MB" if rss["workers"] else ""))
    for name, e in even.items():
        print(f"break-even of {name} vs in process: "
              + (f"~{e['mb']:.0f} MB" if e["mb"] is not None else e["note"]))
    verdicts = ", ".join(f"{s['days']} d {'met' if s['meets_goal'] else 'NOT met'} (ceiling "
                         f"{s['ceiling_vs_raw_read_if_perfectly_parallel']:.2f}x on {os.cpu_count()} cores)"
                         for s in sizes)
    print(f"goal prepare >= {GOAL}x raw read: {verdicts}; wrote {args.out}")


if __name__ == "__main__":
    main()
