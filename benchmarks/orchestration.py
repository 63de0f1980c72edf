"""Orchestration overhead: the same default-profile training task (the hinton_kd teacher, params.yaml)
called plainly vs with MLflow logging, inside a Prefect flow, and both — in one process, interleaved.

    python benchmarks/orchestration.py [--repeats 3]      # writes benchmarks/results/orchestration.json

Goal (issue 3): Prefect + MLflow add ≤ 5 % to the training task. Prefect's ephemeral API starts once
per process; that cold start is measured separately and excluded from the per-run overhead. Flows run
under `flows.runtime.local_run_settings` as the pipeline does; an empty flow with Prefect's default
heartbeats shows what that setting saves.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.chdir(REPO)  # prefect.toml and params.yaml are read from the repository root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "orchestration.json"))
    args = ap.parse_args()

    import torch
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    from flows.runtime import local_run_settings
    from models import create_model, get_method
    from models.distill import DistillationLoss
    from tasks import tracking
    from tasks.common import load_params, write_json
    from tasks.train import LABELS_ONLY, TrainConfig, fit, load_data, train_model

    spec = get_method("hinton_kd")
    mp = load_params()["methods"]["hinton_kd"]
    data_dir = mp["data"]
    if not Path(data_dir).is_dir():
        sys.exit(f"error: {data_dir}: not found; run `dvc repro digits` first")
    cfg = TrainConfig.from_params(mp["teacher"])
    tmp = Path(tempfile.mkdtemp(prefix="bench-mlflow-"))
    ctx = tracking.experiment_context("bench-orchestration", {"tracking_uri": f"sqlite:///{tmp}/mlflow.db",
                                                              "artifact_root": str(tmp / "art")}, {})

    def plain() -> None:
        data = load_data(spec, data_dir)
        torch.manual_seed(0)
        fit(create_model(spec.teacher), data["train"], data["val"], cfg, seed=0,
            criterion=DistillationLoss(LABELS_ONLY))

    def with_mlflow() -> None:
        with tracking.parent_run(ctx, "bench") as parent:
            train_model(spec, "teacher", data_dir, mp, 0, dataclasses.replace(ctx, parent_run_id=parent))

    @task(cache_policy=NO_CACHE)
    def plain_task() -> None:
        plain()

    @task(cache_policy=NO_CACHE)
    def mlflow_task() -> None:
        with_mlflow()

    @flow(name="bench-prefect")
    def prefect_flow() -> None:
        plain_task()

    @flow(name="bench-prefect-mlflow")
    def full_flow() -> None:
        mlflow_task()

    @flow(name="bench-empty")
    def empty_flow() -> None:
        pass

    t0 = time.perf_counter()
    prefect_flow()  # starts the ephemeral API; also warms torch
    cold_start = time.perf_counter() - t0
    variants = {"plain": plain, "mlflow": with_mlflow, "prefect": prefect_flow, "prefect+mlflow": full_flow,
                "empty flow": empty_flow, "empty flow (heartbeats on)": empty_flow}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():  # interleaved, so drift hits every variant alike
            settings = contextlib.nullcontext() if "heartbeats on" in name else local_run_settings()
            with settings:
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)

    base = statistics.median(times["plain"])
    rows = {name: {"median_s": statistics.median(ts), "runs_s": ts,
                   "overhead_ratio": statistics.median(ts) / base - (0 if "empty" in name else 1)}
            for name, ts in times.items()}
    result = {"task": f"hinton_kd teacher, {cfg.epochs} epochs, digits train split",
              "repeats": args.repeats, "prefect_cold_start_s": cold_start, "variants": rows,
              "goal_overhead_ratio": 0.05,
              "meets_goal": rows["prefect+mlflow"]["overhead_ratio"] <= 0.05,
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}}
    write_json(args.out, result)

    print(f"{'variant':<28}{'median s':>10}{'overhead':>10}   (empty flows: share of a plain task)")
    for name, r in rows.items():
        print(f"{name:<28}{r['median_s']:>10.2f}{r['overhead_ratio']:>+10.1%}")
    print(f"prefect cold start (once per process): {cold_start:.1f} s; goal <= +5.0%: "
          f"{'met' if result['meets_goal'] else 'NOT met'}; wrote {args.out}")


if __name__ == "__main__":
    main()
