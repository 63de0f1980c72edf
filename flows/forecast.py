"""The forecast-method flow (ERA5, Pangu-Weather family):

    teacher lead-time models → hierarchical forecaster → [distilled students, students on targets]
    → score every role and baseline by lead time → check the claim → register → report

Started by `python -m flows.method <method>` for methods whose registry entry has kind="forecast".
"""
from __future__ import annotations

import dataclasses
from typing import Any

from prefect import flow

from models import get_method
from tasks import wrappers as t
from tasks.common import method_params, run_lineage
from tasks.tracking import parent_run

from .runtime import deployment_settings, in_deployment


@flow(name="forecast-method", log_prints=True)
def forecast_flow(method: str, params_file: str = "params.yaml", report_path: str | None = None) -> dict[str, Any]:
    spec = get_method(method)
    params, mp = method_params(method, params_file)
    data_dir, seeds, eval_leads = mp["data"], list(mp["seeds"]), list(mp["eval_leads"])

    if in_deployment():  # a worker's fresh clone has dvc.lock but no data
        t.pull_data(data_dir)
    data_hash = t.validate_forecast_inputs(data_dir)
    lineage = run_lineage(data_dir, data_hash)
    ctx = t.open_experiment(spec.name, deployment_settings(params), lineage)

    with parent_run(ctx, spec.name, tags={"method": spec.name, "role": "flow", "claim": " and ".join(
            c.statement for c in spec.claims)}) as parent_id:
        ctx = dataclasses.replace(ctx, parent_run_id=parent_id)
        # a method whose claim is about the teacher trains one per seed (the claim compares means);
        # a distillation method trains one teacher and one student per seed
        teacher_params = {k: mp[k] for k in ("teacher", "device") if k in mp}
        forecasters, by_seed = [], {}
        for s in (seeds if spec.student is None else seeds[:1]):
            by_seed[s] = {lead: t.train_lead_model(spec, "teacher", lead, data_dir, data_hash, teacher_params, s, ctx)
                          for lead in spec.leads}
            forecasters.append(t.compose_forecaster(spec, "teacher", by_seed[s], s, ctx))
            if "iterated_1h" in spec.baselines:
                forecasters.append(t.compose_forecaster(spec, "iterated_1h", {1: by_seed[s][1]}, s, ctx))
        # the registered teacher (and the one students learn from) is the best on validation
        teachers = [f for f in forecasters if f.role == "teacher"]
        teacher = (max if teachers[0].val_higher_is_better else min)(teachers, key=lambda f: f.val_score)
        members = by_seed[teacher.seed]
        teacher_version = t.register_teacher(spec, teacher, ctx)

        students = []
        if spec.student:
            lead = spec.leads[0]  # the student learns the teacher's shortest-lead model
            ref = f"{spec.name}_teacher/{teacher_version}"
            for s in seeds:
                kd = t.train_lead_model(spec, "student_kd", lead, data_dir, data_hash, mp, s, ctx,
                                        teacher=members[lead], teacher_version=ref)
                students.append(t.compose_forecaster(spec, "student_kd", {lead: kd}, s, ctx))
            for s in seeds:
                plain = t.train_lead_model(spec, "student_labels", lead, data_dir, data_hash, mp, s, ctx)
                forecasters.append(t.compose_forecaster(spec, "student_labels", {lead: plain}, s, ctx))

        evaluations = t.evaluate_forecasters(spec, data_dir, forecasters + students, eval_leads, ctx)
        verdict = t.check_claim(spec, evaluations)
        registry = t.register_models(spec, teacher, teacher_version, students, evaluations, verdict, ctx)
        t.log_forecast_plots(evaluations, data_dir, teacher, eval_leads, ctx)
        report = t.write_report(spec, evaluations, verdict, registry, ctx,
                                {"seeds": seeds, "leads": list(spec.leads), "eval_leads": eval_leads,
                                 "lineage": lineage}, report_path)

    print(f"{spec.name}: claim {'PASSED' if verdict['passed'] else 'FAILED'} ({verdict['statement']})")
    return report

