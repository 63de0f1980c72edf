"""The method flow: train teacher → distill student → train baselines → evaluate → check claim → register.

    python -m flows.method hinton_kd                 # what the DVC stage `train@hinton_kd` runs
    python -m flows.method hinton_kd --report PATH   # report elsewhere than metrics/<method>.json

Runs on Prefect's ephemeral API by default (no server); under a Prefect worker the same flow is a
deployment (flows/prefect.yaml). Every step is a task from `tasks.wrappers`; no numerics here.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from prefect import flow

from models import get_method
from tasks import wrappers as t
from tasks.common import cli_main, method_params, run_lineage
from tasks.tracking import parent_run

from .runtime import local_run_settings


@flow(name="distill-method", log_prints=True)
def method_flow(method: str, params_file: str = "params.yaml", report_path: str | None = None) -> dict[str, Any]:
    spec = get_method(method)
    params, mp = method_params(method, params_file)
    data_dir, seeds = mp["data"], list(mp["seeds"])

    data_hash = t.validate_inputs(spec, data_dir)
    lineage = run_lineage(data_dir, data_hash)
    ctx = t.open_experiment(spec.name, params.get("tracking", {}), lineage)

    with parent_run(ctx, f"{spec.name}", tags={"method": spec.name, "role": "flow",
                                                "claim": spec.claim}) as parent_id:
        ctx = dataclasses.replace(ctx, parent_run_id=parent_id)
        # only the teacher's own params, so a student-side change reuses the cached teacher
        teacher_params = {k: mp[k] for k in ("teacher", "device") if k in mp}
        teacher = t.train_teacher(spec, data_dir, data_hash, teacher_params, seeds[0], ctx)
        teacher_version = t.register_teacher(spec, teacher, ctx)
        teacher_ref = f"{spec.name}_teacher/{teacher_version}"
        students = [t.distill_student(spec, teacher, teacher_ref, data_dir, data_hash, mp, s, ctx) for s in seeds]
        baselines = [t.train_baseline(spec, role, data_dir, data_hash, mp, s, ctx)
                     for role in spec.baselines for s in seeds]
        evaluations = t.evaluate_models(spec, data_dir, [teacher, *students, *baselines], ctx)
        verdict = t.check_claim(spec, evaluations)
        registry = t.register_models(spec, teacher, teacher_version, students, evaluations, verdict, ctx)
        report = t.write_report(spec, evaluations, verdict, registry, ctx,
                                {"seeds": seeds, "lineage": lineage}, report_path)

    c = verdict
    print(f"{spec.name}: claim {c['statement']!r} {'PASSED' if c['passed'] else 'FAILED'}: "
          f"{c['left']['mean']:.4f} ± {c['left']['std']:.4f} vs {c['right']['mean']:.4f} ± {c['right']['std']:.4f}")
    return report


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="python -m flows.method", description=__doc__.splitlines()[0])
    ap.add_argument("method")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--report", default=None, help="default: metrics/<method>.json")
    args = ap.parse_args(argv)
    flow_fn = method_flow
    if get_method(args.method).kind == "forecast":
        from .forecast import forecast_flow as flow_fn
    with local_run_settings():
        flow_fn(args.method, args.params, args.report or f"metrics/{args.method}.json")


if __name__ == "__main__":
    cli_main(main)
