"""Where a run came from (code, data, DVC's lock), and which code a method runs.

`method_code_paths` is the one list of the files a method runs. `dvc.yaml` lists the same paths as
`train@<method>`'s deps (tests/test_invalidation.py checks they agree), and the Prefect cache key of
its training hashes them but its declaration file (`training_code_paths`: the declaration's
training-relevant fields are part of the key themselves). So an edit retrains only the methods whose
code it touches: a new method or a new kind adds files, and editing models/weather.py leaves the
digits methods cached.
"""
from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import yaml

from .common import REPO_ROOT

# the generic flow and everything every method runs (flows.worker and tasks.platform.services are
# not: they start the flow, they do not run in it)
SHARED_CODE = (
    "flows/method.py", "flows/steps.py", "flows/runtime.py",
    "tasks/platform/common.py", "tasks/platform/params.py", "tasks/platform/lineage.py",
    "tasks/platform/tracking.py", "tasks/platform/validation.py", "tasks/platform/dvc_remote.py",
    "tasks/platform/progress.py",
    "tasks/train", "tasks/steps", "tasks/kinds/__init__.py", "tasks/kinds/base.py", "tasks/methods/__init__.py",
    "models/__init__.py", "models/registry.py", "models/distill.py",
)


def training_code_paths(kind: str, models: str) -> list[str]:
    """The code that trains a model of a kind and family: what a training cache key hashes."""
    return [*SHARED_CODE, f"tasks/kinds/{kind}", f"models/{models}.py"]


def method_code_paths(method: str, kind: str, models: str) -> list[str]:
    """The code `train@<method>` runs: the shared core, its kind's package, its model family's file
    (`methods.<m>.kind` and `.models` in params.yaml) and its declaration."""
    return [*training_code_paths(kind, models), f"tasks/methods/{method}.py"]


@functools.cache
def code_hash(paths: tuple[str, ...], root: str = str(REPO_ROOT)) -> str:
    """sha256 over the files under `paths` (without caches), in order; computed once per process."""
    import hashlib
    h = hashlib.sha256()
    for rel in paths:
        path = Path(root) / rel
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*.py"))
        for f in files:
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def git_commit(repo: str | os.PathLike = ".") -> dict[str, str]:
    """The commit the code ran from and whether tracked files differ from it. dvc.lock and the
    committed metric summaries and plot data are left out: `dvc repro` rewrites them stage by stage,
    so they are always "modified" while a pipeline runs."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock",
                         ":(exclude)metrics/summary", ":(exclude)metrics/plots"))
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"commit": "unknown", "dirty": "unknown"}
    return {"commit": commit, "dirty": str(dirty).lower()}


def dvc_lock_md5(out_path: str, lock_file: str | os.PathLike = "dvc.lock") -> str | None:
    """The md5 that dvc.lock records for an output path (None when DVC has not produced it)."""
    lock_file = Path(lock_file)
    if not lock_file.is_file():
        return None
    lock = yaml.safe_load(lock_file.read_text()) or {}
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs", []):
            if out.get("path", "").rstrip("/") == out_path.rstrip("/"):
                return out.get("md5")
    return None


def run_lineage(data_dir: str, data_hash: str) -> dict[str, str]:
    """What every run of a flow records about where it came from: code, data and DVC's lock."""
    git = git_commit()
    return {"git_commit": git["commit"], "git_dirty": git["dirty"], "data_dir": data_dir,
            "data_sha256": data_hash, "dvc_lock_md5": dvc_lock_md5(data_dir) or "none"}
