"""DVC stage `digits`: the UCI handwritten digits (shipped inside scikit-learn) → train/val/test Parquet.

    python -m tasks.stages.digits [OUT_DIR]        # params: params.yaml › digits

The source is a CSV of 64 pixel counts (0–16, 8×8 images) and a label per row: by default the copy
bundled with scikit-learn (real scans, no download), or any file of that format named in params.
Each split is validated with Great Expectations before the output directory appears, and again by
the classification kind before anything trains on it (the contract: tasks/kinds/classification/schema.py).
"""
from __future__ import annotations

import gzip
import importlib.resources
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ..kinds.classification.schema import N_PIXELS, PIXEL_COLUMNS, SCHEMA, SPLITS, validate_split
from ..platform.common import StageError, atomic_dir, stage_main, write_json
from ..platform.params import stage_params

OUT_DIR = "data/digits"


def source_path(source: str) -> Path:
    """`sklearn` means the digits.csv.gz bundled with scikit-learn; anything else is a file path."""
    if source == "sklearn":
        return Path(str(importlib.resources.files("sklearn.datasets") / "data" / "digits.csv.gz"))
    return Path(source)


def read_source(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads the digits CSV (optionally gzipped): returns pixels (N, 64) float32 and labels (N,) int64."""
    if not path.is_file():
        raise StageError(path, "source file not found")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data": reported below, in one line
            raw = np.loadtxt(fh, delimiter=",", ndmin=2)
    except (ValueError, OSError, EOFError) as e:
        raise StageError(path, f"not a readable digits CSV: {e}") from e
    if raw.size == 0:
        raise StageError(path, "empty: no rows")
    if raw.shape[1] != N_PIXELS + 1:
        raise StageError(path, f"expected {N_PIXELS + 1} columns (64 pixels + label), found {raw.shape[1]}")
    if not np.isfinite(raw).all():
        rows = np.unique(np.where(~np.isfinite(raw))[0])[:5].tolist()
        raise StageError(path, f"non-finite values in rows {rows}")
    return raw[:, :N_PIXELS].astype(np.float32), raw[:, N_PIXELS].astype(np.int64)


def stratified_split(y: np.ndarray, val: float, test: float, seed: int) -> dict[str, np.ndarray]:
    """Row indices per split, each class divided in the same proportions."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        n_test, n_val = round(len(idx) * test), round(len(idx) * val)
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test:n_test + n_val])
        parts["train"].append(idx[n_test + n_val:])
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


def to_frame(x: np.ndarray, y: np.ndarray) -> pd.DataFrame:
    df = pd.DataFrame(x, columns=PIXEL_COLUMNS)
    df["label"] = y
    return df


def prepare(source: str, out_dir: str | Path, val: float, test: float, seed: int) -> dict[str, int]:
    """Reads the source, splits it, validates and writes `<out_dir>/{train,val,test}.parquet`."""
    path = source_path(source)
    x, y = read_source(path)
    counts = {}
    with atomic_dir(out_dir) as tmp:
        for split, idx in stratified_split(y, val, test, seed).items():
            df = to_frame(x[idx], y[idx])
            # rows labelled by their line in the source, so an error points at the line to fix
            validate_split(df.set_axis(idx, axis=0), source=str(path))
            pq.write_table(pa.Table.from_pandas(df, schema=SCHEMA, preserve_index=False), tmp / f"{split}.parquet")
            counts[split] = len(df)
        write_json(tmp / "meta.json", {"source": source, "rows": counts, "seed": seed})
    return counts


def main(argv: list[str]) -> None:
    params = stage_params("digits")
    out_dir = argv[0] if argv else OUT_DIR
    counts = prepare(params["source"], out_dir, params["split"]["val"], params["split"]["test"], params["seed"])
    print(f"digits: wrote {out_dir} {counts}")


if __name__ == "__main__":
    stage_main(main)
