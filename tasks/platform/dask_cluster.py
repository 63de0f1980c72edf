"""Where a stage's Dask graphs run, chosen by configuration alone.

    cluster: null                  # in-process (Dask's threads, or no Dask at all)
    cluster: "local:4"             # a LocalCluster of 4 worker processes, started and closed by the stage
    cluster: "tcp://10.0.0.5:8786" # an existing scheduler (`dask scheduler` + `dask worker` elsewhere)

`DASK_SCHEDULER_ADDRESS` (Dask's own variable for the same thing) takes precedence over the param,
so a run is moved onto a cluster without editing params.yaml:

    DASK_SCHEDULER_ADDRESS=tcp://10.0.0.5:8786 dvc repro era5_prepare@full

Workers of an existing scheduler import the stage's functions by name and write its outputs to the
paths the client names: they need this checkout (same commit, same NumPy) and a filesystem they
share with the client. Start them without MALLOC_TRIM_THRESHOLD_ (in their Dask config:
`distributed: {nanny: {pre-spawn-environ: {MALLOC_TRIM_THRESHOLD_: null}}}`; see `_local_cluster`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
from typing import Any, Iterator

from .common import StageError

ENV = "DASK_SCHEDULER_ADDRESS"
_LOCAL = re.compile(r"local:([1-9]\d*)")
_ADDRESS = re.compile(r"(tcp|tls|ucx)://[^\s/:]+(:\d+)?")
FORMS = "null, local:N (N >= 1 worker processes) or a scheduler address such as tcp://host:8786"


def check(value: Any) -> str | None:
    """`value` when it is one of the forms above; ValueError (one line) otherwise."""
    if value is None:
        return None
    if not isinstance(value, str) or not (_LOCAL.fullmatch(value) or _ADDRESS.fullmatch(value)):
        raise ValueError(f"must be {FORMS}, got {value!r}")
    return value


def resolve(configured: str | None) -> str | None:
    """The cluster to use: $DASK_SCHEDULER_ADDRESS when set (and not empty), else `configured`."""
    env = os.environ.get(ENV, "").strip()
    if not env:
        return configured
    try:
        return check(env)
    except ValueError as e:
        raise StageError(ENV, str(e)) from None


@contextlib.contextmanager
def connect(cluster: str | None, key: str = "cluster") -> Iterator[Any]:
    """A `distributed.Client` on `cluster` (see `check`), set as Dask's default scheduler while the
    block runs; None (and Dask's default, threads) for None. A LocalCluster started here is closed on
    the way out, whatever ends the block (an error, KeyboardInterrupt, SIGTERM's exception), so no
    worker process outlives the stage. An unreachable scheduler is a StageError naming
    $DASK_SCHEDULER_ADDRESS when that is set, else params.yaml's `key`."""
    if cluster is None:
        yield None
        return
    from dask.distributed import Client

    # distributed logs every worker start and stop at INFO, and warns about ports and memory: a
    # stage's stderr is one line on failure (cli_main), so only errors get through
    logging.getLogger("distributed").setLevel(logging.ERROR)
    local = _LOCAL.fullmatch(cluster)
    started = None
    try:
        if local:
            started = _local_cluster(int(local.group(1)))
        try:
            client = Client(started if started is not None else cluster, timeout="30s")
        except OSError as e:  # nothing listening there, or it timed out
            if os.environ.get(ENV, "").strip():
                raise StageError(ENV, f"cannot reach the Dask scheduler {cluster}: {e}") from None
            raise StageError("params.yaml",
                             f"{key}: cannot reach the Dask scheduler {cluster}: {e}") from None
        with client:
            yield client
    finally:
        if started is not None:
            started.close()


TRIM = "MALLOC_TRIM_THRESHOLD_"


def _local_cluster(n_workers: int) -> Any:
    """N worker processes of one thread each, with glibc's own malloc tuning.

    Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536 (to hand freed memory back to the
    OS sooner). Setting it switches off glibc's dynamic mmap threshold, so every NumPy array over
    128 KiB becomes a fresh mmap whose pages fault in on first touch: this stage's NumPy work took
    1.5-2x the CPU in such a worker (regridding 120 days: 0.17-0.32 s of thread time instead of
    0.08 s) and the distributed path could not catch up with the in-process one. The variable is
    left unset for the workers started here; the nanny also writes it into this process's
    environment (which the spawned workers inherit), so it is kept out while they start.
    """
    import dask
    from dask.distributed import LocalCluster

    before = os.environ.pop(TRIM, None)
    try:
        # the workers log their starts and stops at INFO to the stage's stderr, which must stay one
        # line on failure (cli_main)
        with dask.config.set({f"distributed.nanny.pre-spawn-environ.{TRIM}": None,
                              "logging.distributed": "error"}):
            # port 0: the scheduler serves HTTP (health, metrics) even without a dashboard, and warns
            # on stderr when the default :8787 is taken
            return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                dashboard_address=":0")
    finally:
        os.environ.pop(TRIM, None)
        if before is not None:
            os.environ[TRIM] = before
