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


def test_make_run_full_overrides_give_the_papers_pangu_in_bf16_on_the_full_profile(tmp_path):
    """`make run-full` (a GPU worker's command) applies its -S overrides the way `dvc exp run` does;
    the result must name the full profile's prepared data and build the paper-width model in bf16."""
    import re
    import shlex
    import shutil

    from dvc.utils.hydra import apply_overrides

    from models.weather import PANGU_FULL
    from tasks.train import TrainConfig
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    args = shlex.split(re.search(r"^FULL_OVERRIDES = (.*)$", text, re.M).group(1))
    overrides = [value for flag, value in zip(args[::2], args[1::2]) if flag == "-S"]
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    apply_overrides(str(params), overrides)
    p = yaml.safe_load(params.read_text())
    assert p["era5_profiles"] == ["full"]
    prepare_outs = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["era5_prepare"]["do"]["outs"]
    assert p["methods"]["pangu"]["data"] == prepare_outs[0].replace("${item}", "full")
    teacher = p["methods"]["pangu"]["teacher"]
    assert TrainConfig.from_params(teacher).precision == "bf16"
    full = p["era5_prepare"]["full"]
    surface = [v for v in full["variables"] if v in ("t2m", "msl", "sp", "u10", "v10")]
    model = models.create_model(models.get_method("pangu").teacher, n_upper=len(full["variables"]) - len(surface),
                                n_levels=len(full["levels"]), n_surface=len(surface), n_lat=721, n_lon=1440,
                                **teacher["model"])
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in vars(model.config).items() if k in PANGU_FULL} == \
        {k: v for k, v in PANGU_FULL.items()}
