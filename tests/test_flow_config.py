"""prefect.yaml and dvc.yaml agree with the registry (Prefect drops misspelled deployment keys silently)."""
import importlib

import yaml

import models
from conftest import REPO

DEPLOYMENT_KEYS = {"name", "description", "entrypoint", "parameters", "tags", "schedules",
                   "concurrency_limit", "work_pool", "version", "paused", "pull", "build", "push"}


def test_every_method_has_a_deployment_with_valid_keys_and_schedule():
    from prefect.client.schemas.schedules import CronSchedule
    cfg = yaml.safe_load((REPO / "prefect.yaml").read_text())
    deployed = set()
    for d in cfg["deployments"]:
        assert set(d) <= DEPLOYMENT_KEYS, f"unknown keys {set(d) - DEPLOYMENT_KEYS} in {d['name']}"
        path, fn = d["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), fn)
        spec = models.get_method(d["parameters"]["method"])
        assert flow.name == {"classification": "distill-method", "forecast": "forecast-method"}[spec.kind]
        assert set(d["parameters"]) <= set(flow.parameters.properties)
        for s in d["schedules"]:
            CronSchedule(cron=s["cron"], timezone=s["timezone"])
        assert d["work_pool"]["name"] == "gpu"
        deployed.add(d["parameters"]["method"])
    assert deployed == set(models.list_methods())


def test_dvc_training_stage_runs_the_flow_for_each_method():
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["train"]
    assert stage["foreach"] == "${methods}"
    assert stage["do"]["cmd"] == "python -m flows.method ${key}"
    assert {"models", "tasks", "flows", "${item.data}"} <= set(stage["do"]["deps"])
