"""The e2e tests' pipeline: the whole `dvc repro` that `make run` runs, once per test session, in a
temporary copy of the repository, on the `ci` profile: the default profile with the Pangu-family
training budgets halved (CI_PROFILE), so the suite stays under 30 minutes on 2 cores. Every stage,
method, claim and registry path still runs; the default profile's own time is `make run`'s, reported
in the README. Tests of several modules share it (the `pipeline` fixture in conftest.py)."""
import os
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


# params.yaml edits that make the default profile the ci profile: (text, replacement, occurrences)
CI_PROFILE = [
    ("{epochs: 8, batch_size: 16,", "{epochs: 4, batch_size: 16,", 5),   # pangu, _hta, _student (2), _uk_t2m
    ("{epochs: 240, batch_size: 10,", "{epochs: 120, batch_size: 10,", 1),  # pangu_eda_upper
]


def apply_ci_profile(params):
    text = params.read_text()
    for old, new, count in CI_PROFILE:
        assert text.count(old) == count, f"ci profile: {old!r} is in params.yaml {text.count(old)} times, not {count}"
        text = text.replace(old, new)
    params.write_text(text)


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
