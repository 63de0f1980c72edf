import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tasks.platform.common import StageError, atomic_dir, atomic_path, hash_path, write_json
from tasks.platform.lineage import dvc_lock_md5
from tasks.platform.params import load_params, stage_params

REPO = Path(__file__).resolve().parents[1]


def test_atomic_path_publishes_only_on_success(tmp_path):
    dest = tmp_path / "sub" / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    write_json(dest, {"a": 1})
    assert dest.read_text() == '{\n  "a": 1\n}\n'
    assert oct(dest.stat().st_mode & 0o777) == "0o644"


def test_atomic_dir_replaces_whole_directory_or_nothing(tmp_path):
    dest = tmp_path / "d"
    with atomic_dir(dest) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(dest) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError
    assert [p.name for p in dest.iterdir()] == ["a"]
    with atomic_dir(dest) as tmp:
        (tmp / "c").write_text("3")
    assert [p.name for p in dest.iterdir()] == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_hash_path_depends_on_names_and_contents(tmp_path):
    (tmp_path / "x").write_text("1")
    h1 = hash_path(tmp_path)
    assert hash_path(tmp_path) == h1
    (tmp_path / "x").write_text("2")
    assert hash_path(tmp_path) != h1
    with pytest.raises(StageError, match="not found"):
        hash_path(tmp_path / "nope")


def test_load_params_errors_name_the_file(tmp_path):
    p = tmp_path / "params.yaml"
    with pytest.raises(StageError, match="params file not found"):
        load_params(p)
    p.write_text("a: [1,\n")
    with pytest.raises(StageError, match="not valid YAML"):
        load_params(p)
    p.write_text("a: 1\n")
    with pytest.raises(StageError, match="a: unknown key"):
        load_params(p)
    p.write_text("tracking: {}\n")
    with pytest.raises(StageError, match="has no section 'digits'"):
        stage_params("digits", path=p)


def test_dvc_lock_md5_reads_the_output_entry(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text("schema: '2.0'\nstages:\n  s:\n    outs:\n    - path: data/x\n      md5: abc.dir\n")
    assert dvc_lock_md5("data/x", lock) == "abc.dir"
    assert dvc_lock_md5("data/y", lock) is None
    assert dvc_lock_md5("data/x", tmp_path / "none.lock") is None


def _dead_pid() -> int:
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_removes_temporaries_of_dead_writers_only(tmp_path):
    import os
    from tasks.platform.common import sweep_stale
    dest = tmp_path / "out.zarr"
    dest.mkdir()
    dead = tmp_path / f".out.zarr.{_dead_pid()}.abc.tmp"
    live = tmp_path / f".out.zarr.{os.getpid()}.def.tmp"   # a writer still at work
    other = tmp_path / f".other.{_dead_pid()}.ghi.tmp"      # another output's
    old = tmp_path / ".out.zarr.old"
    for p in (dead, live, other, old):
        p.mkdir()
    (dead / "chunk").write_text("half")
    assert sorted(sweep_stale(dest)) == sorted([dead, old])
    assert live.exists() and other.exists() and dest.exists()


def test_sweep_puts_back_the_previous_output_a_writer_died_between_its_renames(tmp_path):
    from tasks.platform.common import sweep_stale
    dest = tmp_path / "prepared"
    old = tmp_path / ".prepared.old"
    old.mkdir()
    (old / "meta.json").write_text("{}")
    sweep_stale(dest)
    assert (dest / "meta.json").read_text() == "{}" and not old.exists()


def test_a_new_output_sweeps_what_a_killed_writer_left(tmp_path):
    dest = tmp_path / "d"
    stale = tmp_path / f".d.{_dead_pid()}.xyz.tmp"
    stale.mkdir()
    with atomic_dir(dest) as tmp:
        (tmp / "a").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_a_full_disk_names_the_output_not_the_temporary(tmp_path):
    import errno
    dest = tmp_path / "metrics" / "m.json"
    with pytest.raises(StageError, match="cannot write: No space left on device") as e:
        with atomic_path(dest) as tmp:
            tmp.write_text("{")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert e.value.path == str(dest) and list(dest.parent.iterdir()) == []


@pytest.mark.parametrize("body, code, err", [
    ("pass", 0, ""),
    ("raise StageError('data/x', 'broken')", 1, "error: data/x: broken\n"),
])
def test_stage_main_exits_as_python_would_less_the_teardown(tmp_path, body, code, err):
    """stage_main joins non-daemon threads and runs atexit handlers before os._exit, so whatever
    they write lands; buffered stdout is flushed; the exit status is cli_main's."""
    script = tmp_path / "stage.py"
    script.write_text(textwrap.dedent(f"""
        import atexit, sys, threading, time
        from pathlib import Path
        from tasks.platform.common import StageError, stage_main
        out = Path(sys.argv[1])
        def main(argv):
            def late():
                time.sleep(0.3)
                (out / "thread").write_text("joined")
            threading.Thread(target=late).start()
            atexit.register(lambda: (out / "atexit").write_text("ran"))
            print("buffered", end="")
            {body}
        stage_main(main)
    """))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert (proc.returncode, proc.stdout, proc.stderr) == (code, "buffered", err)
    assert (tmp_path / "thread").read_text() == "joined" and (tmp_path / "atexit").read_text() == "ran"


def test_a_failed_directory_is_removed_after_zarrs_io_loop_finishes_its_writes(tmp_path):
    """An interrupt ends the wait in zarr's `sync`, not the write: its coroutines go on, on zarr's own
    event-loop thread, and would re-create the temporary directory after it was removed. Here a
    chunk lands 1 s after the failure, past any fixed quiet period (0.5 s)."""
    import asyncio

    from zarr.core.sync import _get_loop

    async def late_chunk(tmp):
        await asyncio.sleep(1.0)
        (tmp / "t2m" / "c").mkdir(parents=True, exist_ok=True)
        (tmp / "t2m" / "c" / "0").write_bytes(b"chunk")

    dest = tmp_path / "prepared"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(dest) as tmp:
            asyncio.run_coroutine_threadsafe(late_chunk(tmp), _get_loop())  # what sync() leaves running
            raise KeyboardInterrupt
    time.sleep(1.5)
    assert list(tmp_path.iterdir()) == []
