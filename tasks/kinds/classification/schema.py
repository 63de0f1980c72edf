"""The digits data contract: the Parquet layout the `digits` stage writes and the classification kind
reads, and the Great Expectations suites both sides run on it.

Each split is `data/digits/{train,val,test}.parquet`: 64 float pixel columns px_00..px_63 (counts
0–16 of an 8×8 scan) and an int64 `label` (0–9).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ...platform.common import StageError
from ...platform.validation import Suite, validate_frame

SPLITS = ("train", "val", "test")
N_PIXELS = 64
NUM_CLASSES = 10
PIXEL_COLUMNS = [f"px_{i:02d}" for i in range(N_PIXELS)]
SCHEMA = pa.schema([(c, pa.float32()) for c in PIXEL_COLUMNS] + [("label", pa.int64())])


def digits_pixels_suite(columns: list[str], max_value: float = 16.0) -> Suite:
    """Shape, pixel range, labels 0–9, no nulls (NaN counts as null)."""
    def build() -> list[Any]:
        import great_expectations as gx
        E = gx.expectations
        exps: list[Any] = [
            E.ExpectTableColumnsToMatchOrderedList(column_list=columns),
            E.ExpectTableRowCountToBeBetween(min_value=10),
            E.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(10))),
            E.ExpectColumnValuesToNotBeNull(column="label"),
        ]
        for col in columns[:-1]:
            exps += [E.ExpectColumnValuesToNotBeNull(column=col),
                     E.ExpectColumnValuesToBeBetween(column=col, min_value=0, max_value=max_value)]
        return exps
    return build


def class_balance_suite(num_classes: int, tolerance: float = 0.5) -> Suite:
    """On a (label, fraction) frame: every class present, each within ±tolerance of uniform."""
    def build() -> list[Any]:
        import great_expectations as gx
        E = gx.expectations
        uniform = 1.0 / num_classes
        return [E.ExpectTableRowCountToEqual(value=num_classes),
                E.ExpectColumnValuesToBeBetween(column="fraction", min_value=uniform * (1 - tolerance),
                                                max_value=uniform * (1 + tolerance))]
    return build


def validate_split(df: pd.DataFrame, source: str) -> None:
    validate_frame(df, digits_pixels_suite(PIXEL_COLUMNS + ["label"]), source=source, name="digits")
    fractions = df["label"].value_counts(normalize=True).rename("fraction").reset_index()
    validate_frame(fractions, class_balance_suite(NUM_CLASSES), source=source, name="digits-balance")


# ---------------------------------------------------------------------------------------------------
# the consumer side

@dataclass
class Split:
    x: torch.Tensor  # (N, 64) float32 in [0, 1]
    y: torch.Tensor  # (N,) int64


def read_split(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise StageError(path, "not found (run `dvc repro digits`)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise StageError(path, f"not a readable Parquet file: {e}") from e
    if not table.schema.equals(SCHEMA, check_metadata=False):
        got = {f.name: str(f.type) for f in table.schema}
        raise StageError(path, f"wrong schema: expected 64 float pixel columns px_00..px_63 and int64 "
                               f"'label', got {got if len(got) < 8 else list(got)[:8] + ['...']}")
    return table.to_pandas()


def load_splits(data_dir: str | Path, validate: bool = True) -> dict[str, Split]:
    """Reads and validates the three splits; pixels are scaled to [0, 1]."""
    out = {}
    for split in SPLITS:
        path = Path(data_dir) / f"{split}.parquet"
        df = read_split(path)
        if validate:
            validate_split(df, source=str(path))
        x = torch.from_numpy(df[PIXEL_COLUMNS].to_numpy(dtype=np.float32, copy=True)) / 16.0
        y = torch.from_numpy(df["label"].to_numpy(dtype=np.int64, copy=True))
        out[split] = Split(x, y)
    return out
