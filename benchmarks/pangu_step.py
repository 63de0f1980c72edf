"""Pangu-lite training throughput: the plain loop vs the same task through the Prefect flow with
MLflow logging, in one process; FLOPs per step counted by torch's FlopCounterMode.

    python benchmarks/pangu_step.py [--epochs 3]     # needs `dvc repro era5_prepare` first
    → benchmarks/results/pangu_step.json

On a CUDA device (or with `--bf16`) it also runs the plain loop with the pipeline's `precision: bf16`
(forward passes under bf16 autocast, fp32 weights and validation) and reports MFU: achieved FLOP/s over
the device's dense bf16 peak (`--peak-tflops`, default 989 for an H100 SXM). On a CPU there is no
meaningful peak: MFU only when `--peak-tflops` is given explicitly.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.chdir(REPO)


def flops_per_step(model, upper, surface) -> int:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        out_u, out_s = model(upper, surface)
        (out_u.abs().mean() + out_s.abs().mean()).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: 989 on CUDA)")
    ap.add_argument("--bf16", action="store_true", help="run the bf16 variant on a CPU too")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "pangu_step.json"))
    args = ap.parse_args()

    import torch
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    from flows.runtime import local_run_settings
    from models.distill import DistillationLoss
    from tasks.kinds import get_kind
    from tasks.methods import resolve
    from tasks.platform import tracking
    from tasks.platform.common import write_json
    from tasks.steps.train_role import resolve_device, train_unit
    from tasks.train.loop import fit

    spec, mp, _ = resolve("pangu")
    if not Path(mp.data).is_dir():
        sys.exit(f"error: {mp.data}: not found; run `dvc repro era5_prepare` first")
    kind = get_kind(spec.kind)
    cfg = mp.teacher.model_copy(update={"epochs": args.epochs})
    device = resolve_device(mp.device)
    data = kind.load(mp.data)
    lead = 6
    train_set = kind.train_set(data, lead)
    n_samples = len(train_set) * cfg.epochs

    def new_model():
        torch.manual_seed(0)
        return kind.build(spec, "teacher", data, cfg)

    def plain(precision: str = cfg.precision) -> float:
        """The train loop alone, as the flow's task calls it (DataLoader batches, validation per epoch)."""
        model = new_model()
        t = time.perf_counter()
        fit(model, DistillationLoss(kind.labels_loss), train_set, cfg.model_copy(update={"precision": precision}),
            seed=0, forward=kind.forward, validate=lambda m: kind.validate(m, data, lead, device), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    tmp = Path(tempfile.mkdtemp(prefix="bench-pangu-"))
    ctx = tracking.experiment_context("bench-pangu", {"tracking_uri": f"sqlite:///{tmp}/mlflow.db",
                                                      "artifact_root": str(tmp / "art")}, {})

    @task(cache_policy=NO_CACHE)
    def train_task() -> None:
        with tracking.parent_run(ctx, "bench") as parent:
            train_unit(spec, "teacher", lead, 0, cfg, mp.device, {}, mp.data,
                       dataclasses.replace(ctx, parent_run_id=parent))

    @flow(name="bench-pangu-step")
    def bench_flow() -> None:
        train_task()

    @flow(name="bench-warm-up")
    def empty_flow() -> None:
        pass

    model = new_model().to(device)
    b = cfg.batch_size
    step_flops = flops_per_step(model, data.train.upper[:b].to(device), data.train.surface[:b].to(device))
    flops_per_sample = step_flops / b

    with local_run_settings():
        empty_flow()  # Prefect's ephemeral API starts on the first flow run: keep that out of the timing
        plain()  # warm-up (allocator, kernels)
        t_plain = plain()
        t0 = time.perf_counter()
        bench_flow()
        t_flow = time.perf_counter() - t0

    rows = {"plain": {"seconds": t_plain, "samples_per_s": n_samples / t_plain},
            "prefect+mlflow": {"seconds": t_flow, "samples_per_s": n_samples / t_flow}}
    for r in rows.values():
        r["achieved_gflops"] = r["samples_per_s"] * flops_per_sample / 1e9
    result = {"device": str(device), "model": spec.teacher, "lead_hours": lead, "epochs": cfg.epochs,
              "batch_size": b, "samples": n_samples, "flops_per_sample_fwd_bwd": flops_per_sample,
              "variants": rows, "flow_over_plain": rows["prefect+mlflow"]["seconds"] / t_plain,
              "note": "the flow time includes the Prefect flow/task runs and the MLflow run, per-epoch metrics, plot and model"}
    if device.type == "cuda" or args.bf16:
        plain("bf16")  # warm-up: bf16 kernels
        t_bf16 = plain("bf16")
        sps = n_samples / t_bf16
        peak = args.peak_tflops or (989.0 if device.type == "cuda" else None)
        result["bf16"] = {"seconds": t_bf16, "samples_per_s": sps, "achieved_gflops": sps * flops_per_sample / 1e9,
                          "mfu": None if peak is None else sps * flops_per_sample / (peak * 1e12),
                          "peak_tflops": peak,
                          "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None}
    write_json(args.out, result)

    print(f"{'variant':<16}{'seconds':>9}{'samples/s':>11}{'GFLOP/s':>10}")
    for name, r in rows.items():
        print(f"{name:<16}{r['seconds']:>9.2f}{r['samples_per_s']:>11.1f}{r['achieved_gflops']:>10.2f}")
    if "bf16" in result:
        r = result["bf16"]
        mfu = "n/a (no peak for this device)" if r["mfu"] is None else f"{r['mfu']:.2%} of {r['peak_tflops']:g} TFLOP/s"
        print(f"{'bf16':<16}{r['seconds']:>9.2f}{r['samples_per_s']:>11.1f}{r['achieved_gflops']:>10.2f}  MFU {mfu}")
    print(f"flow/plain time ratio {result['flow_over_plain']:.2f} on {device}; wrote {args.out}")


if __name__ == "__main__":
    main()
