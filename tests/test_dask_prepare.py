"""ERA5 prepare on a dask.distributed cluster: the stores it writes are byte-identical to the
in-process ones, the cluster is chosen by configuration alone (params or DASK_SCHEDULER_ADDRESS),
it is closed however the stage ends, and a bad value is one line naming where it was set.

Real clusters of worker processes, on a store small enough that each test takes seconds."""
import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from conftest import REPO
from tasks.platform import dask_cluster
from tasks.platform.common import StageError
from tasks.stages import era5_prepare as prep, era5_synthetic

CFG = {"variables": ["z", "t", "t2m", "msl"], "levels": [850, 500], "grid_deg": 45.0,
       "split": {"val": 0.2, "test": 0.2}, "max_lead_hours": 6}


@pytest.fixture
def raw(tmp_path, monkeypatch):
    """Two days hourly on a 22.5° grid, stored in chunks of 12 steps, and the stage set to read it in
    blocks of 12 steps and write 5 (z, t) or 10 (t2m, msl) steps per chunk: several read blocks are
    split across output chunks and several partial statistics are folded, as at full size."""
    times = pd.date_range("2020-01-01", periods=48, freq="h")
    ds = era5_synthetic.generate(times, 22.5, [850, 500], CFG["variables"], 0)
    ds = ds.assign_attrs(source="synthetic")
    ds.chunk({"time": 12}).to_zarr(tmp_path / "raw.zarr", mode="w", consolidated=False)
    monkeypatch.setattr(prep, "READ_CHUNK_BYTES", 1)  # one stored chunk per block
    monkeypatch.setattr(prep, "CHUNK_BYTES", 5 * 2 * 4 * 8 * 4)  # 5 steps of z on the 4 x 8 grid
    monkeypatch.delenv(dask_cluster.ENV, raising=False)
    return tmp_path / "raw.zarr"


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_output(a: Path, b: Path) -> None:
    """Every file byte for byte (Zarr metadata and chunks, stats.json, meta.json: the raw path they
    name is the same here), and every array decoded: values exactly equal, NaN where NaN, same dims,
    coordinates, attributes and dtype."""
    assert files(a).keys() == files(b).keys()
    for name, content in files(a).items():
        assert content == files(b)[name], f"{name} differs"
    for store in ("train", "val", "test", "climatology"):
        x = xr.open_zarr(a / f"{store}.zarr", consolidated=False).load()
        y = xr.open_zarr(b / f"{store}.zarr", consolidated=False).load()
        xr.testing.assert_identical(x, y)
        for v in x.variables:
            assert x[v].dtype == y[v].dtype and x[v].dims == y[v].dims, (store, v)
            assert np.array_equal(x[v].values, y[v].values, equal_nan=x[v].dtype.kind == "f"), (store, v)
    for doc in ("stats.json", "meta.json"):
        assert json.loads((a / doc).read_text()) == json.loads((b / doc).read_text())


def watch_connect(monkeypatch) -> list:
    """Records (scheduler address, number of workers) of each cluster the stage connects to."""
    seen, connect = [], dask_cluster.connect

    def watched(cluster, key="cluster"):
        with connect(cluster, key) as client:
            if client is not None:
                seen.append((client.scheduler.address, len(client.scheduler_info()["workers"])))
            yield client
    monkeypatch.setattr(dask_cluster, "connect", contextlib.contextmanager(watched))
    return seen


def test_a_local_cluster_writes_the_same_bytes_as_in_process_and_is_closed(raw, tmp_path, monkeypatch):
    here = prep.prepare(raw, tmp_path / "here", CFG)
    threads = prep.prepare(raw, tmp_path / "threads", dict(CFG, dask=True))  # Dask, no cluster
    seen = watch_connect(monkeypatch)
    cluster = prep.prepare(raw, tmp_path / "cluster", dict(CFG, dask=True, cluster="local:2"))
    assert [n for _, n in seen] == [2]  # it ran on the 2 worker processes the stage started ...
    assert multiprocessing.active_children() == []  # ... and stopped
    assert here == threads == cluster
    assert here["splits"]["train"]["n_times"] == 22  # 5 chunks of z: the partials went through the tree
    assert_same_output(tmp_path / "here", tmp_path / "threads")
    assert_same_output(tmp_path / "here", tmp_path / "cluster")
    assert not list(tmp_path.glob(".cluster*"))


def test_dask_scheduler_address_wins_and_auto_picks_dask_above_the_threshold(raw, tmp_path, monkeypatch):
    from dask.distributed import LocalCluster
    prep.prepare(raw, tmp_path / "here", CFG)
    # an existing scheduler, as `dask scheduler` would run, reached over TCP (workers in threads here:
    # processes are the other test's)
    started = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, protocol="tcp://",
                           dashboard_address=":0")
    try:
        monkeypatch.setenv(dask_cluster.ENV, started.scheduler_address)
        seen = watch_connect(monkeypatch)
        # local:7 in params is overridden; auto chooses Dask because the selection is over the threshold
        prep.prepare(raw, tmp_path / "env", dict(CFG, cluster="local:7", dask_above_mb=0.01))
        assert seen == [(started.scheduler_address, 2)]
        prep.prepare(raw, tmp_path / "small", dict(CFG, cluster="local:7"))  # under it: in-process
        assert len(seen) == 1
    finally:
        started.close()
    assert_same_output(tmp_path / "here", tmp_path / "env")
    assert_same_output(tmp_path / "here", tmp_path / "small")


def test_the_cluster_is_closed_when_the_stage_is_interrupted():
    with pytest.raises(KeyboardInterrupt):
        with dask_cluster.connect("local:1") as client:
            assert len(client.scheduler_info()["workers"]) == 1
            raise KeyboardInterrupt
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("value", ["local:0", "locall:2", "tcp://", "4", 4])
def test_a_bad_cluster_value_is_one_line_naming_the_key(tmp_path, value):
    from tasks.platform.params import load_params
    params = {"era5_prepare": {"small": dict(CFG, cluster=value)}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(StageError) as e:
        load_params(tmp_path / "params.yaml")
    assert e.value.path == str(tmp_path / "params.yaml")
    assert e.value.problem.startswith("era5_prepare.small.cluster: must be null, local:N"), e.value.problem
    assert "\n" not in str(e.value)


def test_the_command_line_prints_that_line_alone(raw, tmp_path):
    params = {"era5_prepare": {"small": dict(CFG, cluster="local:two")}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if k != dask_cluster.ENV}
    cmd = [sys.executable, "-m", "tasks.stages.era5_prepare", "--profile", "small", "raw.zarr", "out"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: params.yaml: era5_prepare.small.cluster: must be null, local:N (N >= 1 worker processes) "
        "or a scheduler address such as tcp://host:8786, got 'local:two'"], proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_bad_dask_scheduler_address_names_the_variable_and_writes_nothing(raw, tmp_path, monkeypatch):
    monkeypatch.setenv(dask_cluster.ENV, "my-cluster:8786")
    with pytest.raises(StageError, match="must be null, local:N") as e:
        prep.prepare(raw, tmp_path / "out", dict(CFG, dask=True))
    assert e.value.path == dask_cluster.ENV
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_an_unreadable_raw_chunk_names_the_variable_on_the_dask_path_too(raw, tmp_path):
    chunk = sorted(p for p in (raw / "t" / "c").rglob("*") if p.is_file())[0]
    chunk.write_bytes(b"\x00garbage" * 8)
    with pytest.raises(StageError, match=r"^.*: t: unreadable chunk \(") as e:
        prep.prepare(raw, tmp_path / "out", dict(CFG, dask=True))  # read in a task, raised there
    assert e.value.path == str(raw)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
