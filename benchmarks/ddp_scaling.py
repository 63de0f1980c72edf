"""Data-parallel scaling of the one train loop: 1 process against 2 torchrun processes (gloo, DDP
all-reduce), same global batch, same data, same model.

    python benchmarks/ddp_scaling.py [--repeats 3]      → benchmarks/results/ddp_scaling.json

Variants, per model (the pipeline's digits CNN at width 32, ~94k parameters, and at width 128,
~1.5M): the plain loop with one thread (the baseline), the plain loop with as many threads as
processes (what one process gets from the same cores), and DDP with one thread per rank.
Efficiency = samples/s of N ranks / (N × the one-thread baseline). Samples/s are from the ranks'
own epoch timers (warm-up epoch dropped), so torchrun's start (~8 s here) is not in them; it is
listed separately, since a method pays it once per training. Repeats are interleaved.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

from ddp_steps import REPO, measure

MODELS = {"digits_cnn w32": {"width": 32}, "digits_cnn w128": {"width": 128}}


def launch_seconds() -> float:
    """torchrun with 2 ranks that import torch and join the process group, then exit."""
    code = "import torch.distributed as d; d.init_process_group('gloo'); d.barrier(); d.destroy_process_group()"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                    "--no-python", sys.executable, "-c", code], check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ddp_scaling.json"))
    args = ap.parse_args()
    from tasks.platform.common import write_json

    n = args.nproc
    variants = {"1 process, 1 thread": dict(nproc=0, threads=1),
                f"1 process, {n} threads": dict(nproc=0, threads=n),
                f"{n} processes DDP, 1 thread each": dict(nproc=n, threads=1)}
    runs: dict = {}
    for _ in range(args.repeats):
        for model, kwargs in MODELS.items():
            for name, v in variants.items():
                r = measure(**v, model="digits_cnn", model_kwargs=kwargs)
                runs.setdefault(model, {}).setdefault(name, []).append(r)
    launches = [launch_seconds() for _ in range(args.repeats)]

    rows = {}
    for model, by_variant in runs.items():
        base = statistics.median(r["samples_per_s"] for r in by_variant["1 process, 1 thread"])
        rows[model] = {}
        for name, rs in by_variant.items():
            sps = statistics.median(r["samples_per_s"] for r in rs)
            procs = rs[0]["nproc"] or 1
            cores = max(procs, rs[0]["threads"])
            rows[model][name] = {"samples_per_s": sps, "samples_per_s_runs": [r["samples_per_s"] for r in rs],
                                 "step_ms": statistics.median(r["step_ms"] for r in rs),
                                 "n_params": rs[0]["n_params"], "speedup_vs_1_thread": sps / base,
                                 "efficiency": sps / (cores * base)}
    result = {"cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "global_batch": 64, "samples": 2048, "nproc": n, "torchrun_start_s": statistics.median(launches),
              "models": rows}
    write_json(args.out, result)

    print(f"{'model':<17}{'variant':<32}{'params':>9}{'samples/s':>11}{'step ms':>9}{'speedup':>9}{'efficiency':>11}")
    for model, variants_ in rows.items():
        for name, r in variants_.items():
            print(f"{model:<17}{name:<32}{r['n_params']:>9}{r['samples_per_s']:>11.0f}{r['step_ms']:>9.2f}"
                  f"{r['speedup_vs_1_thread']:>8.2f}x{r['efficiency']:>11.2f}")
    print(f"torchrun start + join + exit ({n} ranks): {result['torchrun_start_s']:.1f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
