"""Orchestration overhead: the same default-profile training task (the hinton_kd teacher, params.yaml)
called plainly vs with MLflow logging, inside a Prefect flow, and both, in one process, interleaved;
then what each DVC training stage pays to reach a Prefect API, three ways.

    python benchmarks/orchestration.py [--repeats 5]      # writes benchmarks/results/orchestration.json

Goal (issue 3): Prefect + MLflow add <= 5 % to the training task. Flows run under
`flows.runtime.local_run_settings` as the pipeline does; an empty flow with Prefect's default
heartbeats shows what that setting saves.

Per-stage start (each a fresh process, as a DVC stage is; the cost is the process's time to finish
one empty flow minus the same process importing Prefect and doing nothing):
  ephemeral, new home   Prefect's ephemeral server on a new database (a fresh clone's first stage)
  ephemeral             the ephemeral server on an existing database (every later `dvc repro` stage)
  shared server         a server started once per `dvc repro` (flows/repro.py, `make run`)
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.chdir(REPO)  # prefect.toml and params.yaml are read from the repository root

STAGE_PROBE = """
import time; t0 = time.perf_counter()
from prefect import flow
from flows.runtime import local_run_settings
@flow(name="stage-probe")
def probe(): return 1
if {run}:
    with local_run_settings():
        probe()
print(time.perf_counter() - t0)
"""


def stage_start_costs(repeats: int) -> dict:
    """Seconds a fresh process needs to run one empty flow, beyond importing Prefect, three ways."""
    from tasks.platform import services as sv

    def probe(env: dict, run: bool) -> float:
        out = subprocess.run([sys.executable, "-c", STAGE_PROBE.format(run=run)], cwd=REPO, env=env,
                             capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])

    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    base.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONPATH=str(REPO))
    home = Path(tempfile.mkdtemp(prefix="bench-prefect-"))
    t0 = time.perf_counter()
    server = sv.start_prefect(home, sv.free_port(), None, services=False, home=home / "server")
    server_start = time.perf_counter() - t0
    shared = dict(base, PREFECT_API_URL=server.url, DISTILLERY_LOCAL_PREFECT="1")
    runs: dict[str, list[float]] = {}
    try:
        probe(dict(base, PREFECT_HOME=str(home / "warm")), True)  # creates the warm home's database
        for i in range(repeats):  # interleaved
            imports = probe(base, False)
            for name, env in (("ephemeral, new home", dict(base, PREFECT_HOME=str(home / f"new{i}"))),
                              ("ephemeral", dict(base, PREFECT_HOME=str(home / "warm"))),
                              ("shared server", shared)):
                runs.setdefault(name, []).append(probe(env, True) - imports)
    finally:
        server.stop()
    return {"per_stage_s": {name: statistics.median(ts) for name, ts in runs.items()}, "runs_s": runs,
            "shared_server_start_once_s": server_start}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "orchestration.json"))
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
    from tasks.steps.train_role import train_unit
    from tasks.train.loop import fit

    spec, mp, _ = resolve("hinton_kd")
    if not Path(mp.data).is_dir():
        sys.exit(f"error: {mp.data}: not found; run `dvc repro digits` first")
    kind = get_kind(spec.kind)
    cfg = mp.teacher
    tmp = Path(tempfile.mkdtemp(prefix="bench-mlflow-"))
    ctx = tracking.experiment_context("bench-orchestration", {"tracking_uri": f"sqlite:///{tmp}/mlflow.db",
                                                              "artifact_root": str(tmp / "art")}, {})

    def plain() -> None:
        data = kind.load(mp.data)
        torch.manual_seed(0)
        device = torch.device("cpu")
        fit(kind.build(spec, "teacher", data, cfg), DistillationLoss(kind.labels_loss), kind.train_set(data, None),
            cfg, seed=0, forward=kind.forward, validate=lambda m: kind.validate(m, data, None, device))

    def with_mlflow() -> None:
        with tracking.parent_run(ctx, "bench") as parent:
            train_unit(spec, "teacher", None, 0, cfg, mp.device, {}, mp.data,
                       dataclasses.replace(ctx, parent_run_id=parent))

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
    with local_run_settings():
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

    # ratios within each repeat, then their median: the machine's speed drifts by 20% over a run here,
    # and a variant only ever meets the plain task it was interleaved with
    rows = {name: {"median_s": statistics.median(ts), "runs_s": ts,
                   "overhead_ratio": statistics.median(t / p for t, p in zip(ts, times["plain"]))
                   - (0 if "empty" in name else 1)}
            for name, ts in times.items()}
    stages = stage_start_costs(max(3, args.repeats // 2))
    result = {"task": f"hinton_kd teacher, {cfg.epochs} epochs, digits train split",
              "repeats": args.repeats, "prefect_cold_start_s": cold_start, "variants": rows,
              "goal_overhead_ratio": 0.05,
              "meets_goal": rows["prefect+mlflow"]["overhead_ratio"] <= 0.05,
              "stage_start": stages,
              "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}}
    write_json(args.out, result)

    print(f"{'variant':<28}{'median s':>10}{'overhead':>10}   (paired by repeat; empty flows: share of a plain task)")
    for name, r in rows.items():
        print(f"{name:<28}{r['median_s']:>10.2f}{r['overhead_ratio']:>+10.1%}")
    print(f"\n{'Prefect API, per DVC stage':<28}{'median s':>10}")
    for name, s in stages["per_stage_s"].items():
        print(f"{name:<28}{s:>10.2f}")
    print(f"{'(shared server start, once)':<28}{stages['shared_server_start_once_s']:>10.2f}")
    print(f"\nprefect cold start in this process: {cold_start:.1f} s; goal <= +5.0%: "
          f"{'met' if result['meets_goal'] else 'NOT met'}; wrote {args.out}")


if __name__ == "__main__":
    main()
