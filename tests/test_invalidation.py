"""Narrow invalidation: every DVC stage depends on exactly the code it runs, and a method's Prefect cache
key hashes the same files. (tests/test_e2e.py checks the consequence on a real pipeline: adding a
method or editing models/weather.py leaves the other stages up to date.)"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from tasks.platform.lineage import code_hash, method_code_paths, training_code_paths

PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def stage_deps(name):
    """The deps DVC resolves for a stage (foreach items expanded by DVC itself)."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo
    with Repo(str(REPO)) as repo:
        (stage,) = repo.stage.collect(name)
        return {str(d.def_path) for d in stage.deps if not isinstance(d, ParamsDependency)}


def imported_project_files(code):
    """Project files a fresh interpreter has loaded after running `code`."""
    probe = code + "\nimport sys, json\nprint(json.dumps(sorted({m.__file__ for m in list(sys.modules.values()) " \
                   "if getattr(m, '__file__', None) and m.__file__.startswith(" + repr(str(REPO)) + ")})))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    files = {str(Path(f).relative_to(REPO)) for f in json.loads(out.stdout.strip().splitlines()[-1])}
    return {f for f in files if f.startswith(("flows/", "tasks/", "models/"))}  # not a .venv inside the checkout


def covered(files, deps):
    """The files not under any dep path; empty package __init__ files need no dep."""
    def empty_init(f):
        return f.endswith("__init__.py") and not (REPO / f).read_text().strip().strip('"').strip()
    return sorted(f for f in files if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)
                  and not empty_init(f) and f != "tasks/__init__.py")


@pytest.mark.parametrize("method", sorted(PARAMS["methods"]))
def test_a_methods_stage_depends_on_exactly_its_code(method):
    mp = PARAMS["methods"][method]
    assert stage_deps(f"train@{method}") == {mp["data"], *method_code_paths(method, mp["kind"], mp["models"])}


@pytest.mark.parametrize("method", sorted(PARAMS["methods"]))
def test_everything_a_method_imports_is_among_its_deps(method):
    mp = PARAMS["methods"][method]
    files = imported_project_files(
        "import flows.method, tasks.platform.dvc_remote\n"
        "from tasks.methods import resolve\nfrom tasks.kinds import get_kind\n"
        f"spec, mp, _ = resolve({method!r})\nget_kind(spec.kind)")
    assert covered(files, method_code_paths(method, mp["kind"], mp["models"])) == []
    # and nothing of another kind or model family
    kind_files = [f for f in files if f.startswith("tasks/kinds/") and f.count("/") > 2]
    assert all(f.startswith(f"tasks/kinds/{mp['kind']}/") for f in kind_files)
    assert not any(f.startswith("models/") and f.removeprefix("models/").removesuffix(".py")
                   not in ("__init__", "registry", "distill", mp["models"]) for f in files)


@pytest.mark.parametrize("stage,module", [("digits", "tasks.stages.digits"),
                                          ("era5_download@default", "tasks.stages.era5_download"),
                                          ("era5_prepare@default", "tasks.stages.era5_prepare")])
def test_a_data_stage_depends_on_what_it_imports_and_no_training_code(stage, module):
    files = imported_project_files(f"import {module}\nimport tasks.stages.era5_synthetic" if "download" in module
                                   else f"import {module}")
    deps = stage_deps(stage)
    assert covered(files, deps) == []
    assert not any(f.startswith(("tasks/train", "tasks/steps", "flows/", "models/")) for f in files)


# data stages that run models/ code (plain PyTorch), with the model files each may import
MODEL_STAGES = [("videos@default", "tasks.stages.videos", "video_encoders"),
                ("video_extractors", "tasks.stages.video_extractors", "video_encoders"),
                ("video_features@default", "tasks.stages.video_features", "video_encoders"),
                ("video_features@samples", "tasks.stages.video_features", "video_encoders"),
                *[(f"{stage}@{profile}", f"tasks.stages.{stage}", "voxelize") for stage in ("scans", "voxelize")
                  for profile in PARAMS["pointcloud_profiles"]]]


@pytest.mark.parametrize("stage,module,model_file", MODEL_STAGES, ids=[s for s, _, _ in MODEL_STAGES])
def test_a_video_or_pointcloud_stage_depends_on_exactly_what_it_imports(stage, module, model_file):
    files = imported_project_files(f"import {module}")
    deps = stage_deps(stage)
    assert covered(files, deps) == []
    code_deps = {d for d in deps if d.startswith(("tasks/", "models/", "flows/"))}
    assert code_deps <= files, f"deps it does not import: {sorted(code_deps - files)}"
    # data stages: nothing of training; of models/ only their own file (and the package it sits in)
    assert not any(f.startswith(("tasks/train", "tasks/steps", "tasks/methods", "flows/")) for f in files)
    assert {f for f in files if f.startswith("models/")} <= {"models/__init__.py", "models/registry.py",
                                                             f"models/{model_file}.py"}
    if stage.startswith("voxelize@"):
        assert f"data/pointcloud/{stage.split('@')[1]}/scans" in deps


def test_the_cache_key_hashes_the_training_code_and_changes_with_it(tmp_path):
    import shutil
    for rel in ("flows", "tasks", "models"):
        shutil.copytree(REPO / rel, tmp_path / rel, ignore=shutil.ignore_patterns("__pycache__"))
    digits = tuple(training_code_paths("classification", "vision"))
    pangu = tuple(training_code_paths("forecast", "weather"))
    assert set(method_code_paths("pangu", "forecast", "weather")) - set(pangu) == {"tasks/methods/pangu.py"}
    before = code_hash(digits, str(tmp_path)), code_hash(pangu, str(tmp_path))
    with open(tmp_path / "models" / "weather.py", "a") as fh:
        fh.write("\n# an edit\n")
    code_hash.cache_clear()
    after = code_hash(digits, str(tmp_path)), code_hash(pangu, str(tmp_path))
    assert after[0] == before[0] and after[1] != before[1]


def test_methods_with_the_same_teacher_share_its_training():
    from types import SimpleNamespace

    from flows.steps import _training_identity
    from tasks.methods import get_method
    ctx = SimpleNamespace(store_id="sqlite:////x/mlflow.db@1")
    key = lambda method, role: _training_identity(None, {"spec": get_method(method), "role": role, "ctx": ctx})
    assert key("pangu", "teacher") == key("pangu_hta", "teacher") == key("pangu_student", "teacher")
    assert key("hinton_kd", "teacher") == key("fitnet_hint", "teacher")
    assert key("hinton_kd", "student_labels") == key("fitnet_hint", "student_labels")
    assert key("hinton_kd", "student_kd") != key("fitnet_hint", "student_kd")  # their losses differ
    assert key("pangu", "teacher") != key("hinton_kd", "teacher")
    other_store = SimpleNamespace(store_id="sqlite:////y/mlflow.db@2")
    assert key("pangu", "teacher") != _training_identity(None, {"spec": get_method("pangu"), "role": "teacher",
                                                                "ctx": other_store})



def test_the_committed_lock_records_the_code_as_it_is():
    """dvc.lock's hash of every code dep (flows/, tasks/, models/) is the code's: an edit to a stage's
    code without `dvc repro` or `dvc commit` would make a fresh clone's first `make run` look stale
    for the wrong reason, and hide which stages an edit really touches."""
    from dvc.repo import Repo
    from dvc_data.hashfile.build import build
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())
    recorded = {d["path"]: (d["md5"], d["size"]) for stage in lock["stages"].values()
                for d in stage.get("deps", []) if d["path"].startswith(("flows/", "tasks/", "models/"))}
    assert recorded
    stale = []
    with Repo(str(REPO)) as repo:
        for path, (md5, size) in sorted(recorded.items()):
            _, meta, obj = build(repo.cache.local, str(REPO / path), repo.fs, "md5", ignore=repo.dvcignore)
            if (obj.hash_info.value, meta.size) != (md5, size):
                stale.append(f"{path}: lock {md5} ({size} B), code {obj.hash_info.value} ({meta.size} B)")
    assert stale == []
