"""The e2e tests' pipeline: the whole `dvc repro` that `make run` runs, once per test session, in a
temporary copy of the repository, on the `ci` profile: the default profile with every training budget
quartered (`apply_ci_profile`), so the suite stays well under 30 minutes on 2 cores. Every stage,
method, claim and registry path still runs; the default profile's own time is `make run`'s, reported
in the README. Tests of several modules share it (the `pipeline` fixture in conftest.py)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from checkout import copy_checkout

REPO = Path(__file__).resolve().parents[1]


def sh(cmd, cwd, env, check=True):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, shell=isinstance(cmd, str))
    if check and proc.returncode:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


CI_EPOCH_DIVISOR = 4


def apply_ci_profile(params):
    """The ci profile: every role of every method trains a quarter of its default epochs (at least
    one). Data, models, seeds, claims and everything else stay the default's, and so does the rest
    of the file, byte for byte (tests edit it as text)."""
    text = params.read_text()
    head, methods = text.split("\nmethods:\n", 1)
    methods, n = re.subn(r"(?<![\w])epochs: (\d+)",
                         lambda m: f"epochs: {max(1, int(m[1]) // CI_EPOCH_DIVISOR)}", methods)
    assert n, f"ci profile: no `epochs:` under methods in {params}"
    params.write_text(f"{head}\nmethods:\n{methods}")


def run_pipeline(tmp_path_factory):
    """Copies the committed and untracked-but-not-ignored files, commits them, runs `dvc repro`."""
    root = tmp_path_factory.mktemp("e2e") / "repo"
    shared = REPO.parent / "shared"
    if not shared.is_dir() and os.environ.get("CI") == "true":
        pytest.fail(f"{shared} is missing: the samples profile needs the real ERA5 files")
    if shared.is_dir():
        (root.parent / "shared").symlink_to(shared)  # the samples profile reads ../shared/data
    copy_checkout(root)
    apply_ci_profile(root / "params.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env['PATH']}", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               GIT_AUTHOR_NAME="e2e", GIT_AUTHOR_EMAIL="e2e@localhost",
               GIT_COMMITTER_NAME="e2e", GIT_COMMITTER_EMAIL="e2e@localhost")
    sh("git init -q && git add -A && git commit -qm e2e", root, env)
    first = sh([sys.executable, "-m", "flows.repro"], root, env)  # what `make run` runs
    return root, env, first
