"""TernGrad against full-precision all-reduce on 2 torchrun ranks (gloo, loopback): bytes each rank
hands to the collectives per optimizer step (counted by the hooks, tasks/train/comm_hooks.py) and
time per step, same model, data and global batch.

    python benchmarks/terngrad.py [--repeats 3]      → benchmarks/results/terngrad.json

Models: the terngrad method's digits CNN (width 32, ~94k parameters, one DDP bucket) and widths 128
and 256 (~1.5M and ~6M parameters, several buckets), where communication is a larger part of a
step. On loopback, bytes are nearly free and TernGrad's encode/decode (clip, scale, rounding, 2-bit
packing, unpacking every rank's part) is pure cost; `step_ms_at_1gbps` adds the counted bytes at
1 Gbit/s (bytes × 8 / 1e9 per step, the wire time of a commodity network, not measured) to show
where the trade turns.
"""
from __future__ import annotations

import argparse
import os
import statistics

from ddp_steps import REPO, measure

MODELS = {"digits_cnn w32": {"width": 32}, "digits_cnn w128": {"width": 128}, "digits_cnn w256": {"width": 256}}
GOAL = 8.0  # the method's claim: at least 8x fewer bytes per step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "terngrad.json"))
    args = ap.parse_args()
    from tasks.platform.common import write_json

    runs: dict = {}
    for _ in range(args.repeats):
        for model, kwargs in MODELS.items():
            for hook in ("allreduce", "terngrad"):
                r = measure(nproc=2, threads=1, hook=hook, model="digits_cnn", model_kwargs=kwargs, epochs=3)
                runs.setdefault(model, {}).setdefault(hook, []).append(r)

    rows = {}
    for model, by_hook in runs.items():
        rows[model] = {}
        for hook, rs in by_hook.items():
            step_ms = statistics.median(r["step_ms"] for r in rs)
            sent = rs[0]["comm_bytes_per_step"]
            rows[model][hook] = {"n_params": rs[0]["n_params"], "bytes_per_step": sent, "step_ms": step_ms,
                                 "step_ms_runs": [r["step_ms"] for r in rs],
                                 "step_ms_at_1gbps": step_ms + sent * 8 / 1e9 * 1000}
        full, tern = rows[model]["allreduce"], rows[model]["terngrad"]
        rows[model]["bytes_ratio"] = full["bytes_per_step"] / tern["bytes_per_step"]
        rows[model]["time_ratio"] = tern["step_ms"] / full["step_ms"]
        rows[model]["time_ratio_at_1gbps"] = tern["step_ms_at_1gbps"] / full["step_ms_at_1gbps"]
    result = {"cpus": os.cpu_count(), "ranks": 2, "backend": "gloo (loopback)", "global_batch": 64,
              "goal_bytes_ratio": GOAL, "models": rows,
              "meets_goal": all(r["bytes_ratio"] >= GOAL for r in rows.values())}
    write_json(args.out, result)

    print(f"{'model':<17}{'hook':<11}{'params':>9}{'bytes/step':>12}{'step ms':>9}{'ms @1Gb/s':>11}")
    for model, r in rows.items():
        for hook in ("allreduce", "terngrad"):
            h = r[hook]
            print(f"{model:<17}{hook:<11}{h['n_params']:>9}{h['bytes_per_step']:>12.0f}{h['step_ms']:>9.2f}"
                  f"{h['step_ms_at_1gbps']:>11.2f}")
        print(f"{'':<17}{'ratio':<11}{'':>9}{r['bytes_ratio']:>11.1f}x{r['time_ratio']:>8.2f}x"
              f"{r['time_ratio_at_1gbps']:>10.2f}x")
    print(f"goal >= {GOAL}x fewer bytes: {'met' if result['meets_goal'] else 'NOT met'}; wrote {args.out}")


if __name__ == "__main__":
    main()
