import pytest

from tasks.platform.common import StageError, atomic_dir, atomic_path, hash_path, write_json
from tasks.platform.lineage import dvc_lock_md5
from tasks.platform.params import load_params, stage_params


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
