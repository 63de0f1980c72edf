"""A stage stopped by SIGTERM or Ctrl-C cleans up: no temporary output, one line, exit 143 / 130.
(SIGKILL cannot be cleaned up after: the next run sweeps, tests/test_common.py; and the whole
pipeline killed at random moments: tests/test_kill_trials.py.)"""
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml

from conftest import REPO
from tasks.stages import era5_download, era5_synthetic

PREPARE = {"variables": ["z", "t", "u", "v", "t2m", "msl"], "levels": [850, 500, 250], "grid_deg": None,
           "split": {"val": 0.15, "test": 0.15}, "max_lead_hours": 24}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Big enough (60 days hourly on the 5.625° grid) that writing the prepared stores takes a while."""
    work = tmp_path_factory.mktemp("interrupt")
    times = pd.date_range("2020-01-01", periods=60 * 24, freq="h")
    ds = era5_synthetic.generate(times, 5.625, [850, 500, 250], ["z", "t", "u", "v", "t2m", "msl"], 0)
    era5_download.write_store(ds, work / "raw.zarr", "synthetic")
    (work / "params.yaml").write_text(yaml.safe_dump({"era5_prepare": {"t": PREPARE}}))
    return work


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_a_signal_while_writing_leaves_no_temporary(raw, sig, code, word):
    out = raw / f"prepared-{sig.name}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # a background job (`nohup make test &`) inherits SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: give the stage the default disposition a terminal's Ctrl-C meets
    proc = subprocess.Popen([sys.executable, "-m", "tasks.stages.era5_prepare", "--profile", "t", "raw.zarr", out.name],
                            cwd=raw, env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 300
        while not list(raw.glob(f".{out.name}.*.tmp")):  # the temporary output exists: it is writing
            assert proc.poll() is None and time.monotonic() < deadline, "finished before it could be stopped"
            time.sleep(0.01)
        proc.send_signal(sig)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert err.strip().splitlines() == [f"error: {word} ({sig.name}); nothing was published"]
    assert not out.exists() and not list(raw.glob(f".{out.name}*"))
