"""Data for a run on a worker: `dvc pull` of a method's inputs from the DVC remote.

A deployment's flow run starts in a fresh clone that has `dvc.lock` but no data. The remote is
DISTILLERY_DVC_REMOTE on the worker (a path or an s3://, gs://, ssh:// URL), else the repository's
default remote. Unlike `dvc pull --allow-missing`, which prints "No remote provided" and exits 0,
this fails with one line naming what is missing.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .common import StageError

REMOTE_ENV = "DISTILLERY_DVC_REMOTE"


def dvc(*args: str, cwd: str | os.PathLike = ".") -> subprocess.CompletedProcess:
    """Runs this environment's `dvc` (beside sys.executable), else the one on PATH."""
    exe = Path(sys.executable).with_name("dvc")
    return subprocess.run([str(exe) if exe.exists() else "dvc", *args], cwd=cwd, capture_output=True, text=True)


def pull(path: str, env: dict[str, str] | None = None, cwd: str | os.PathLike = ".") -> str:
    """Pulls the DVC-tracked output `path` (e.g. `data/digits`) into `cwd`; returns `path`."""
    env = dict(os.environ if env is None else env)
    remote = env.get(REMOTE_ENV)
    if remote:
        added = dvc("remote", "add", "--local", "--force", "worker", remote, cwd=cwd)
        if added.returncode:
            raise StageError(REMOTE_ENV, f"dvc cannot use remote {remote!r}: {_last_line(added)}")
        args = ["pull", "--remote", "worker", path]
    elif dvc("config", "core.remote", cwd=cwd).stdout.strip():
        args = ["pull", path]
    else:
        raise StageError(REMOTE_ENV, "not set, and the repository has no default DVC remote: set it on the "
                                     "worker (a path, s3://, gs:// or ssh:// URL) or commit one with "
                                     "`dvc remote add -d`")
    pulled = dvc(*args, cwd=cwd)
    if pulled.returncode or not (Path(cwd) / path).exists():
        raise StageError(path, f"dvc pull failed ({_last_line(pulled) or 'nothing pulled'}); "
                               f"`dvc push` it where it was produced")
    return path


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
    return lines[-1] if lines else ""
