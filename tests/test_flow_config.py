"""The Makefile's GPU command agrees with params.yaml and the registry (prefect.yaml: test_worker.py;
dvc.yaml: test_invalidation.py)."""
import yaml

import models
import models.weather  # noqa: F401
from conftest import REPO
from tasks.methods import get_method


def test_make_run_full_overrides_give_the_papers_pangu_in_bf16_on_the_full_profile(tmp_path):
    """`make run-full` (a GPU worker's command) applies its -S overrides the way `dvc exp run` does;
    the result must name the full profile's prepared data and build the paper-width model in bf16."""
    import re
    import shlex
    import shutil

    from dvc.utils.hydra import apply_overrides

    from models.weather import PANGU_FULL
    from tasks.platform.params import TrainParams
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    args = shlex.split(re.search(r"^FULL_OVERRIDES = (.*)$", text, re.M).group(1))
    overrides = [value for flag, value in zip(args[::2], args[1::2]) if flag == "-S"]
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    apply_overrides(str(params), overrides)
    from tasks.platform.params import load_params
    load_params(params)  # the overridden file passes the schema
    p = yaml.safe_load(params.read_text())
    assert p["era5_profiles"] == ["full"]
    prepare_outs = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["era5_prepare"]["do"]["outs"]
    assert p["methods"]["pangu"]["data"] == prepare_outs[0].replace("${item}", "full")
    teacher = p["methods"]["pangu"]["teacher"]
    assert TrainParams(**teacher).precision == "bf16"
    full = p["era5_prepare"]["full"]
    surface = [v for v in full["variables"] if v in ("t2m", "msl", "sp", "u10", "v10")]
    model = models.create_model(get_method("pangu").teacher, n_upper=len(full["variables"]) - len(surface),
                                n_levels=len(full["levels"]), n_surface=len(surface), n_lat=721, n_lon=1440,
                                **teacher["model"])
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in vars(model.config).items() if k in PANGU_FULL} == \
        {k: v for k, v in PANGU_FULL.items()}
