"""Great Expectations: runs a suite on a frame and turns failures into one StageError line.

Every stage validates its output before writing it, and every consumer its input before training on
it, with the suites of the data's contract (`tasks/kinds/<kind>/schema.py`). Suites are functions
returning fresh expectation lists (GX binds an expectation to one suite).
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
