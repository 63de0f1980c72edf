"""Progress bars for the long loops: downloads, feature extraction, training epochs.

    for path in progress_bar(paths, desc="era5 files", unit="file"): ...
    bar = progress_bar(total=epochs, desc="hinton_kd · student_kd seed 0", unit="epoch")

One rule decides whether a bar is drawn, so every stage behaves alike: only when someone watches.
`DISTILLERY_PROGRESS=1` forces bars on and `=0` off; otherwise none under CI (`CI=true`: CI logs keep
every redraw as a line) and none when stderr is not a terminal (a log file, `dvc repro` in a pipe, a
Prefect worker's captured output). A disabled bar still iterates and accepts `update`/`set_postfix`,
so callers never branch on it.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterable, Iterator, TextIO

from tqdm import tqdm

ENV = "DISTILLERY_PROGRESS"
_ON, _OFF = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def progress_enabled(stream: TextIO | None = None) -> bool:
    """Whether a bar on `stream` (default: stderr) is drawn: the override, else not under CI, else a TTY."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in _ON:
        return True
    if forced in _OFF:
        return False
    # an unrecognised value falls through to the automatic rule rather than failing a long stage
    if os.environ.get("CI", "").strip().lower() in _ON:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable: Iterable[Any] | None = None, *, total: float | None = None,
                 desc: str | None = None, unit: str = "it", enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr, drawn only when `progress_enabled()` and `enabled` (e.g. only on a
    distributed run's main rank). Other tqdm keywords (`initial`, `unit_scale`, ...) pass through."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=not (enabled and progress_enabled()), **kwargs)


@contextlib.contextmanager
def dask_progress(desc: str) -> Iterator[None]:
    """A bar over the tasks of each Dask computation inside the block (a lazy source's reads and
    writes happen there, not in a loop of ours). Local schedulers only: a distributed cluster
    reports on its own dashboard."""
    from dask.callbacks import Callback  # imported here: the train loop imports this module too

    class TaskBar(Callback):
        # opened in `_start`: Dask calls `_finish` for every started callback, even when it fails
        # before the graph's state (and so the task count) exists
        def _start(self, dsk: Any) -> None:
            self.bar = progress_bar(desc=desc, unit="task")

        def _start_state(self, dsk: Any, state: dict[str, Any]) -> None:
            self.bar.total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
            self.bar.refresh()

        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            self.bar.update()

        def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
            self.bar.close()

    with TaskBar():
        yield
