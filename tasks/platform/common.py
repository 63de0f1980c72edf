"""Shared plumbing for every entry point: clear errors, atomic writes, content hashes."""
from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

REPO_ROOT = Path(__file__).resolve().parents[2]


class StageError(Exception):
    """An input problem a user can fix: names the file and what is wrong with it."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path, self.problem = str(path), problem
        super().__init__(f"{path}: {problem}")


# ---------------------------------------------------------------------------------------------------
# atomic outputs: a later stage must never see a half-written artefact
#
# A temporary output sits beside its destination as `.<name>.<pid>.<random>.tmp` and is renamed onto
# it only when complete. An exception, SIGINT or SIGTERM (see `cli_main`) removes it; a SIGKILL or a
# crash cannot, so the next writer of the same destination sweeps temporaries whose process is gone.

def _temp_prefix(dest: Path) -> str:
    return f".{dest.name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def sweep_stale(dest: str | os.PathLike) -> list[Path]:
    """Removes what interrupted writers of `dest` left beside it; returns what was removed.

    `.<name>.<pid>.<random>.tmp` of a dead process goes (a live one may be another writer's). A
    `.<name>.old` is the previous output, left when a writer died between its two renames: it is put
    back when `dest` is missing, else removed."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    removed = []
    for tmp in dest.parent.glob(f".{_glob_escape(dest.name)}.*.tmp"):
        pid = tmp.name[len(dest.name) + 2:].split(".", 1)[0]
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
        _remove(tmp)
        removed.append(tmp)
    old = dest.with_name(f".{dest.name}.old")
    if old.exists():
        if dest.exists():
            _remove(old)
            removed.append(old)
        else:
            os.replace(old, dest)
    return removed


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# errors that mean "this output cannot be written here", whatever library met them
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def _output_errors(dest: Path) -> Iterator[None]:
    """A full disk or a read-only folder met while writing `dest` becomes a StageError naming `dest`
    (the library's own message names a temporary file, or nothing)."""
    try:
        yield
    except OSError as e:
        if e.errno not in _WRITE_ERRNOS:
            raise
        raise StageError(dest, f"cannot write: {e.strerror or e} (nothing was published; the previous "
                               f"output, if any, is intact)") from None


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `dest`; renames it onto `dest` only if the block succeeds."""
    dest = Path(dest)
    with _output_errors(dest):
        yield from _atomic_path(dest)


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary directory beside `dest`; it replaces `dest` only if the block succeeds."""
    dest = Path(dest)
    with _output_errors(dest):
        yield from _atomic_dir(dest)


def _atomic_path(dest: Path) -> Iterator[Path]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(dest)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(dest), suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_dir(dest: Path) -> Iterator[Path]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(dest)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(dest), suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if dest.exists():
            # two renames, so a reader sees the old or the new directory, never a mix; a writer
            # killed between them leaves `.<name>.old`, which the next one puts back (sweep_stale)
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            _settle_zarr_io()
            _remove_until_settled(tmp)


def _settle_zarr_io(timeout: float = 30.0) -> None:
    """Waits for the writes still running on zarr's I/O event loop. An interrupt ends the caller's
    wait in zarr's `sync`, not the write: its coroutines go on, on zarr's own thread, and would
    re-create a temporary directory after it was removed. Nothing to do where zarr is not loaded."""
    zarr_sync = sys.modules.get("zarr.core.sync")
    loop = zarr_sync.loop[0] if zarr_sync is not None else None
    if loop is None or loop.is_closed() or not loop.is_running():
        return
    import asyncio  # loaded already, with zarr

    async def others_done() -> None:
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
    with contextlib.suppress(Exception):  # a broken loop must not hide the error being raised
        asyncio.run_coroutine_threadsafe(others_done(), loop).result(timeout + 5)


def _remove_until_settled(path: Path, quiet: float = 0.5, limit: float = 5.0) -> None:
    """Removes a failed temporary directory, again if it reappears within `quiet` seconds: a thread
    of the writing library (a Dask worker's task) may still finish a chunk, re-creating the
    directory. Whatever comes later still is swept by the next writer."""
    deadline = time.monotonic() + limit
    shutil.rmtree(path, ignore_errors=True)
    settled_at = time.monotonic() + quiet
    while time.monotonic() < min(settled_at, deadline):
        time.sleep(0.05)
        if path.exists():
            shutil.rmtree(path, ignore_errors=True)
            settled_at = time.monotonic() + quiet


def read_json(path: str | os.PathLike, missing: str) -> Any:
    """A JSON file this project wrote, or a StageError naming it: "not found (<missing>)", e.g.
    "run `dvc repro scans`", or not valid JSON. The caller checks the shape it needs."""
    path = Path(path)
    if not path.is_file():
        raise StageError(path, f"not found ({missing})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StageError(path, f"not valid JSON: {e}") from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------
# content hashes

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


# ---------------------------------------------------------------------------------------------------
# entry points

class Terminated(BaseException):
    """SIGTERM as an exception, so that `finally` blocks (temporary outputs, open runs) run, as they
    do for Ctrl-C. A BaseException, like KeyboardInterrupt, so `except Exception` does not swallow it."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def stage_main(fn: Callable[[list[str]], Any]) -> None:
    """What a DVC stage's `python -m …` runs: `cli_main`, then Python's own exit less its last step.

    Python ends a process by joining non-daemon threads, running atexit handlers (Prefect's and
    MLflow's flushes, logging's, temporary files'), and then tearing the interpreter down: every
    module and object, which after importing torch, MLflow, Prefect and GX takes ~2.3 s a process
    here, about a minute of `dvc repro`. This makes the first two steps, flushes stdout and stderr,
    and leaves with os._exit. Outputs are written and renamed into place before (atomic_path), so the
    skipped teardown holds nothing to publish. An uncaught exception keeps Python's usual exit.
    """
    try:
        cli_main(fn)
        code = 0
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    threading._shutdown()   # what the interpreter runs first at exit: joins the non-daemon threads
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cli_main(fn: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
    """Runs a stage's main: a StageError becomes one line on stderr and exit status 1; SIGTERM and
    SIGINT clean up and exit 143 and 130 with one line."""
    main_thread = threading.current_thread() is threading.main_thread()  # signal() works only there
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        fn(sys.argv[1:] if argv is None else argv)
    except StageError as e:
        print(f"error: {e.path}: {e.problem}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:
        # a full disk, a read-only or vanished folder: the file and the reason, not a traceback
        where = e.filename or "output"
        print(f"error: {where}: {e.strerror or e}", file=sys.stderr)
        sys.exit(1)
    except Terminated:
        print("error: terminated (SIGTERM); nothing was published", file=sys.stderr)
        sys.exit(143)
    except KeyboardInterrupt:
        print("error: interrupted (SIGINT); nothing was published", file=sys.stderr)
        sys.exit(130)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
