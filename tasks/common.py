"""Shared plumbing for the stage entry points: params, atomic writes, content hashes, clear errors."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILE = "params.yaml"


class StageError(Exception):
    """An input problem a user can fix: names the file and what is wrong with it."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


def load_params(path: str | os.PathLike = PARAMS_FILE, section: str | None = None) -> dict[str, Any]:
    """Reads params.yaml (or one top-level section of it), with a clear error when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise StageError(path, "params file not found")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise StageError(path, f"not valid YAML: {e}") from e
    if section is None:
        return params
    if section not in params:
        raise StageError(path, f"has no section {section!r}")
    return params[section]


def profile_params(section: str, argv: list[str], path: str | os.PathLike = PARAMS_FILE) -> tuple[dict[str, Any], list[str]]:
    """Stage params, with `--profile NAME` choosing `<section>.<NAME>` (e.g. `era5.samples`); without
    the flag the section itself. Returns the params and the remaining (positional) arguments."""
    if "--profile" not in argv:
        return load_params(path, section), argv
    i = argv.index("--profile")
    if i + 1 >= len(argv):
        raise StageError(path, "--profile needs a name")
    name, rest = argv[i + 1], argv[:i] + argv[i + 2:]
    profiles = load_params(path, section)
    if name not in profiles:
        raise StageError(path, f"{section} has no profile {name!r}; profiles: {sorted(profiles)}")
    return profiles[name], rest


# ---------------------------------------------------------------------------------------------------
# atomic outputs: a later stage must never see a half-written artefact

@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `dest`; renames it onto `dest` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary directory beside `dest`; it replaces `dest` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if dest.exists():
            # two renames, so a reader sees the old or the new directory, never a mix
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------
# lineage

def hash_path(path: str | os.PathLike) -> str:
    """sha256 over a file, or over a directory's relative file names and contents (sorted)."""
    path = Path(path)
    if not path.exists():
        raise StageError(path, "not found")
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def git_commit(repo: str | os.PathLike = ".") -> dict[str, str]:
    """The commit the code ran from and whether tracked files differ from it. dvc.lock is left out:
    `dvc repro` rewrites it stage by stage, so it is always "modified" while a pipeline runs."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)dvc.lock"))
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


def method_params(method: str, params_file: str | os.PathLike = PARAMS_FILE) -> tuple[dict[str, Any], dict[str, Any]]:
    """The whole params file and its `methods.<method>` section (a clear error when that is missing)."""
    params = load_params(params_file)
    section = (params.get("methods") or {}).get(method)
    if section is None:
        raise StageError(params_file, f"no section methods.{method}")
    if not section.get("seeds"):
        raise StageError(params_file, f"methods.{method}.seeds is empty")
    return params, section


def run_lineage(data_dir: str, data_hash: str) -> dict[str, str]:
    """What every run of a flow records about where it came from: code, data and DVC's lock."""
    git = git_commit()
    return {"git_commit": git["commit"], "git_dirty": git["dirty"], "data_dir": data_dir,
            "data_sha256": data_hash, "dvc_lock_md5": dvc_lock_md5(data_dir) or "none"}


# ---------------------------------------------------------------------------------------------------
# entry points

def cli_main(fn: Callable[[list[str]], Any]) -> None:
    """Runs a stage's main: a StageError becomes one line on stderr and exit status 1."""
    try:
        fn(sys.argv[1:])
    except StageError as e:
        print(f"error: {e.path}: {e.problem}", file=sys.stderr)
        sys.exit(1)
