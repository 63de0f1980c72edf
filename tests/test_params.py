"""params.yaml is checked before any work: each mistake a new user made exits 1 with one line naming
the file and the key path, before anything trains and before any MLflow run opens."""
import os
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from tasks.platform.common import StageError
from tasks.platform.params import load_params


def params():
    return yaml.safe_load((REPO / "params.yaml").read_text())


def run(cwd, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_API"))}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def edited(tmp_path, edit):
    p = params()
    edit(p)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    return tmp_path


def drop(path):
    def edit(p):
        *parents, last = path.split(".")
        node = p
        for key in parents:
            node = node[key]
        del node[last]
    return edit


def assign(path, value):
    def edit(p):
        *parents, last = path.split(".")
        node = p
        for key in parents:
            node = node[key]
        node[last] = value
    return edit


def test_the_committed_params_validate():
    p = load_params(REPO / "params.yaml")
    assert p.methods["hinton_kd"].teacher.lr == 0.003 and p.methods["hinton_kd"].student.cache_teacher


@pytest.mark.parametrize("edit,line", [
    (assign("methods.hinton_kd.teacher.lr", -0.003),
     "error: params.yaml: methods.hinton_kd.teacher.lr: must be > 0, got -0.003"),
    (drop("methods.hinton_kd.teacher.lr"), "error: params.yaml: methods.hinton_kd.teacher.lr: required, missing"),
    (assign("methods.hinton_kd.loss", {"kdd": {"weight": 0.9}}),
     "error: params.yaml: methods.hinton_kd.loss.kdd: not a loss term of hinton_kd (its terms: ce, kd)"),
    (assign("methods.hinton_kd.teacher.epochs", "thirty"),
     "error: params.yaml: methods.hinton_kd.teacher.epochs: input should be a valid integer, unable to parse "
     "string as an integer, got 'thirty'"),
    (assign("methods.hinton_kd.student.precision", "fp8"),
     "error: params.yaml: methods.hinton_kd.student.precision: must be one of 'fp32' or 'bf16', got 'fp8'"),
    (assign("methods.hinton_kd.teachr", {"epochs": 1}), "error: params.yaml: methods.hinton_kd.teachr: unknown key"),
    (assign("methods.hinton_kd.seeds", [0, 0, 1]),
     "error: params.yaml: methods.hinton_kd.seeds: must be distinct non-negative integers, got [0, 0, 1]"),
    (assign("methods.hinton_kd.kind", "forecast"),
     "error: params.yaml: methods.hinton_kd.kind: hinton_kd is a classification method, got 'forecast'"),
    (assign("methods.hinton_kd.models", "weather"),
     "error: params.yaml: methods.hinton_kd.models: digits_cnn is defined in models/vision.py, got 'weather'"),
    (drop("digits.seed"), "error: params.yaml: digits.seed: required, missing"),
    (assign("era5_prepare.default.grid_deg", 0), "error: params.yaml: era5_prepare.default.grid_deg: must be > 0, got 0"),
    (assign("era5_prepare.default.grid_deg", -0.5),
     "error: params.yaml: era5_prepare.default.grid_deg: must be > 0, got -0.5"),
    (assign("methods.pangu.eval_leads", [6]),
     "error: params.yaml: methods.pangu.eval_leads: the claim needs leads [6, 24], got [6]"),
])
def test_a_bad_value_stops_the_flow_before_anything_runs(tmp_path, edit, line):
    cwd = edited(tmp_path, edit)
    method = line.split("methods.")[1].split(".")[0] if "methods." in line else "hinton_kd"
    proc = run(cwd, "flows.method", method)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [line]
    # nothing started: no tracking store, no Prefect home, no report
    assert sorted(p.name for p in cwd.iterdir()) == ["params.yaml"]


def test_an_unknown_method_names_the_known_ones(tmp_path):
    cwd = edited(tmp_path, lambda p: None)
    proc = run(cwd, "flows.method", "no_such_method")
    assert proc.returncode == 1
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: params.yaml: methods.no_such_method: no such method in params.yaml; methods: [")


def test_a_params_block_without_a_declaration_is_named(tmp_path):
    cwd = edited(tmp_path, lambda p: p["methods"].__setitem__("ghost", p["methods"]["hinton_kd"]))
    proc = run(cwd, "flows.method", "ghost")
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: params.yaml: methods.ghost: no declaration tasks/methods/ghost.py")


def test_stage_params_are_checked_for_their_profile(tmp_path):
    cwd = edited(tmp_path, assign("era5_prepare.default.grid_deg", 0))
    proc = run(cwd, "tasks.stages.era5_prepare", "--profile", "default", "raw.zarr", "out")
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: params.yaml: era5_prepare.default.grid_deg: must be > 0, got 0"
    edited(tmp_path, lambda p: None)
    proc = run(cwd, "tasks.stages.era5_prepare", "raw.zarr", "out")
    assert proc.stderr.strip() == "error: command line: --profile NAME is required: era5_prepare has one section per profile"


def test_levels_on_surface_only_data_are_an_error_not_ignored(tmp_path):
    """A surface-only raw store (2 m temperature) with `levels: [500]` asked for."""
    from test_era5_prepare import small_raw
    small_raw(tmp_path / "raw.zarr", variables=("t2m",), levels=())
    cfg = {"variables": ["t2m"], "levels": [500], "grid_deg": None, "split": {"val": 0.15, "test": 0.15},
           "max_lead_hours": 24}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"era5_prepare": {"uk": cfg}}))
    proc = run(tmp_path, "tasks.stages.era5_prepare", "--profile", "uk", "raw.zarr", "out")
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("error: params.yaml: era5_prepare.uk.levels: [500] requested, but raw.zarr has no "
                                   "upper-air variables; set levels: []")
    assert not (tmp_path / "out").exists()


def test_the_loader_names_the_file_and_the_key(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("methods:\n  m:\n    kind: classification\n")
    with pytest.raises(StageError) as e:
        load_params(p)
    assert e.value.path == str(p) and e.value.problem == "methods.m.models: required, missing"
