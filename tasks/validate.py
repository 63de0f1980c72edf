"""Great Expectations suites: every stage validates its output before writing it, and every consumer
validates its input before training on it.

Suites are functions returning fresh expectation lists (GX binds an expectation to one suite).
"""
from __future__ import annotations

import functools
import uuid
from typing import Any, Callable

import pandas as pd

from .common import StageError

Suite = Callable[[], list[Any]]


@functools.cache
def _context():
    import great_expectations as gx  # 3 s import: only when something is validated
    from great_expectations.data_context.types.base import ProgressBarsConfig
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return ctx


def validate_frame(df: pd.DataFrame, suite: Suite, *, source: str, name: str = "frame") -> None:
    """Runs `suite` on `df`; raises StageError naming `source` and each failed expectation."""
    import great_expectations as gx

    ctx = _context()
    tag = f"{name}-{uuid.uuid4().hex[:8]}"
    batch = (ctx.data_sources.add_pandas(name=tag)
             .add_dataframe_asset(name=tag)
             .add_batch_definition_whole_dataframe(tag))
    gx_suite = ctx.suites.add(gx.ExpectationSuite(name=tag, expectations=suite()))
    result = gx.ValidationDefinition(name=tag, data=batch, suite=gx_suite).run(
        batch_parameters={"dataframe": df})
    if not result.success:
        failed = [_describe(r) for r in result.results if not r.success]
        raise StageError(source, f"failed validation ({len(failed)} expectations): " + "; ".join(failed[:5]))


def _describe(r: Any) -> str:
    cfg = r.expectation_config
    kwargs = {k: v for k, v in cfg.kwargs.items() if k in ("column", "min_value", "max_value", "value_set")
              and not (k == "value_set" and len(v) > 10)}
    observed = r.result.get("observed_value", r.result.get("unexpected_count"))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    return f"{cfg.type}({', '.join(f'{k}={fmt(v)}' for k, v in kwargs.items())}) observed {fmt(observed)}"


# ---------------------------------------------------------------------------------------------------
# suites

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
