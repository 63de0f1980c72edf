"""The digits data stage: splits, schema, validation, and bad input → clear error, nothing written."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from tasks.kinds.classification import schema
from tasks.platform.common import StageError
from tasks.stages import digits


def test_stratified_split_is_a_disjoint_cover_with_class_proportions():
    y = np.repeat(np.arange(10), [100 + 7 * k for k in range(10)])
    splits = digits.stratified_split(y, val=0.2, test=0.25, seed=3)
    all_idx = np.concatenate(list(splits.values()))
    assert sorted(all_idx.tolist()) == list(range(len(y)))  # disjoint and complete
    for cls in range(10):
        n = (y == cls).sum()
        assert abs((y[splits["test"]] == cls).sum() - 0.25 * n) <= 1
        assert abs((y[splits["val"]] == cls).sum() - 0.2 * n) <= 1
    again = digits.stratified_split(y, val=0.2, test=0.25, seed=3)
    assert all((again[s] == splits[s]).all() for s in splits)


def test_read_source_reads_the_bundled_sklearn_copy():
    from sklearn.datasets import load_digits
    x, y = digits.read_source(digits.source_path("sklearn"))
    ref = load_digits()
    np.testing.assert_array_equal(x, ref.data.astype(np.float32))
    np.testing.assert_array_equal(y, ref.target)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("d") / "digits"
    counts = digits.prepare("sklearn", out, val=0.2, test=0.2, seed=0)
    return out, counts


def test_prepare_writes_three_validated_parquet_splits(prepared):
    out, counts = prepared
    assert sum(counts.values()) == 1797
    for split in schema.SPLITS:
        table = pq.read_table(out / f"{split}.parquet")
        assert table.schema.equals(schema.SCHEMA, check_metadata=False)
        assert table.num_rows == counts[split]
    data = schema.load_splits(out)
    assert data["train"].x.shape == (counts["train"], 64)
    assert 0.0 <= float(data["train"].x.min()) and float(data["train"].x.max()) <= 1.0
    assert not list(out.parent.glob(".digits*"))  # no temp dirs left behind


def write_csv(path, rows):
    path.write_text("\n".join(",".join(str(v) for v in r) for r in rows) + "\n")
    return path


def good_rows(n=60):
    rng = np.random.default_rng(0)
    return [list(rng.integers(0, 17, 64)) + [i % 10] for i in range(n)]


@pytest.mark.parametrize("mutate,message", [
    (lambda rows: [r[:-2] for r in rows], "expected 65 columns"),
    (lambda rows: [r if i != 5 else r[:3] + ["nan"] + r[4:] for i, r in enumerate(rows)], "non-finite values in rows \\[5\\]"),
    (lambda rows: [r if i != 2 else [99] + r[1:] for i, r in enumerate(rows)], "failed validation.*px_00"),
    (lambda rows: [r[:-1] + [3] for r in rows], "failed validation.*expect_table_row_count_to_equal"),  # one class only
])
def test_bad_source_raises_naming_the_file_and_writes_nothing(tmp_path, mutate, message):
    src = write_csv(tmp_path / "bad.csv", mutate(good_rows()))
    out = tmp_path / "out"
    with pytest.raises(StageError, match=message) as e:
        digits.prepare(str(src), out, 0.2, 0.2, 0)
    assert str(src) in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_missing_source(tmp_path):
    with pytest.raises(StageError, match="source file not found"):
        digits.prepare(str(tmp_path / "nope.csv"), tmp_path / "out", 0.2, 0.2, 0)


def test_failed_rerun_keeps_the_previous_output(prepared, tmp_path):
    import shutil
    out = tmp_path / "digits"
    shutil.copytree(prepared[0], out)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(StageError):
        digits.prepare(str(write_csv(tmp_path / "bad.csv", [r[:-2] for r in good_rows()])), out, 0.2, 0.2, 0)
    assert sorted(p.name for p in out.iterdir()) == before


def copy_splits(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def test_consumer_rejects_missing_wrong_schema_and_nan(prepared, tmp_path):
    d = copy_splits(prepared[0], tmp_path / "missing")
    (d / "val.parquet").unlink()
    with pytest.raises(StageError, match="val.parquet: not found"):
        schema.load_splits(d)

    d = copy_splits(prepared[0], tmp_path / "schema")
    df = pd.read_parquet(d / "train.parquet").rename(columns={"label": "target"})
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), d / "train.parquet")
    with pytest.raises(StageError, match="train.parquet: wrong schema"):
        schema.load_splits(d)

    d = copy_splits(prepared[0], tmp_path / "nan")
    df = pd.read_parquet(d / "test.parquet")
    df.loc[3, "px_10"] = np.nan
    pq.write_table(pa.Table.from_pandas(df, schema=schema.SCHEMA, preserve_index=False), d / "test.parquet")
    with pytest.raises(StageError, match=r"test.parquet: failed validation.*px_10: 1 value\(s\) null or NaN .* at row 3"):
        schema.load_splits(d)

    d = copy_splits(prepared[0], tmp_path / "garbage")
    (d / "train.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(StageError, match="train.parquet: not a readable Parquet file"):
        schema.load_splits(d)


@pytest.mark.parametrize("params,error", [
    ("digits:\n  source: missing.csv\n  split: {val: 0.2, test: 0.2}\n  seed: 0\n",
     "error: missing.csv: source file not found"),
    ("digits:\n  source: sklearn\n  split: {val: 0.2, test: 1.5}\n  seed: 0\n",
     "error: params.yaml: digits.split.test: must be < 1, got 1.5"),
    ("digits:\n  source: sklearn\n  split: {val: 0.6, test: 0.4}\n  seed: 0\n",
     "error: params.yaml: digits.split: val + test must be < 1, got 0.6 + 0.4"),
    ("digits:\n  source: sklearn\n  split: {val: 0.2, test: 0.2}\n", "error: params.yaml: digits.seed: required, missing"),
])
def test_stage_cli_exits_nonzero_with_one_line_error_and_no_output(tmp_path, params, error):
    (tmp_path / "params.yaml").write_text(params)
    proc = subprocess.run([sys.executable, "-m", "tasks.stages.digits", "out"], cwd=tmp_path,
                          capture_output=True, text=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1
    assert proc.stderr.strip() == error
    assert not (tmp_path / "out").exists()
