"""`make run` killed with SIGKILL at seeded random moments, then rerun: the rerun completes, every
artefact validates, `dvc status` is clean, MLflow has no run left RUNNING and no run registered twice,
and no process of the killed run is left. benchmarks/kill_trials.py runs 20 trials (README); `make test`, 1."""
import pytest

import kill_trials  # benchmarks/, on sys.path by conftest

pytestmark = pytest.mark.kill


def test_pipeline_survives_sigkill_at_random_moments(tmp_path):
    # hinton_kd alone (the data stages, one flow): ~40 s a run here; the benchmark adds pangu
    result = kill_trials.run_trials(tmp_path, trials=1, seed=11, methods=("hinton_kd",))
    assert result["survived"] == result["trials"] == 1
