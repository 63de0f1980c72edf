"""dvc.yaml and the Makefile's GPU command agree with the registry and params.yaml (prefect.yaml: test_worker.py)."""
import yaml

import models
from conftest import REPO


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
