"""Great Expectations: runs a suite on a frame and turns failures into one StageError line.

Every stage validates its output before writing it, and every consumer its input before training on
it, with the suites of the data's contract (`tasks/kinds/<kind>/schema.py`). Suites are functions
returning fresh expectation lists (GX binds an expectation to one suite).

A consumer's pass is remembered (`passed_before`, `remember_pass`): the same bytes (content hash)
checked by the same contract code and GX version pass again, so the methods that share a data set
validate it once on a machine, not once each (importing GX alone takes ~3.5 s a process here). Any
change to the data or to the contract's code validates again.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import uuid
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from .common import REPO_ROOT, StageError, write_json

PASSES = REPO_ROOT / ".validations"   # one file per (kind, data hash, contract code, GX version)

Suite = Callable[[], list[Any]]


@functools.cache
def _context():
    import great_expectations as gx  # 3 s import: only when something is validated
    from great_expectations.data_context.types.base import ProgressBarsConfig
    # its INFO lines ("Created temporary directory …") would reach stderr where Prefect configured
    # logging; GX sets INFO on some of its loggers itself, so the parent's level is not enough
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("great_expectations")]:
        logging.getLogger(name).setLevel(logging.WARNING)
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
    # SUMMARY: failed expectations report some unexpected values and their row labels (df.index)
    result = gx.ValidationDefinition(name=tag, data=batch, suite=gx_suite).run(
        batch_parameters={"dataframe": df}, result_format="SUMMARY")
    if not result.success:
        failed = [_describe(r) for r in result.results if not r.success]
        raise StageError(source, f"failed validation ({len(failed)} expectations): " + "; ".join(failed[:5]))


def _describe(r: Any) -> str:
    """One failed expectation in words: the column, the rule, and the first offending values with
    their rows (`df.index`: callers label rows with what a user can look up, e.g. the source row)."""
    cfg, res = r.expectation_config, r.result
    kwargs = cfg.kwargs
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    values, rows = res.get("partial_unexpected_list") or [], res.get("partial_unexpected_index_list") or []
    if kwargs.get("column") and values:
        if "min_value" in kwargs or "max_value" in kwargs:
            rule = f"outside [{fmt(kwargs.get('min_value'))}, {fmt(kwargs.get('max_value'))}]"
        elif "value_set" in kwargs:
            rule = "not in the allowed set"
        elif cfg.type == "expect_column_values_to_not_be_null":
            rule = "null or NaN"
        else:
            rule = "unexpected"
        where = ", ".join(f"{fmt(v)} at row {i}" for v, i in list(zip(values, rows))[:3])
        return f"{kwargs['column']}: {res.get('unexpected_count', len(values))} value(s) {rule} ({cfg.type}): {where}"
    shown = {k: v for k, v in kwargs.items() if k in ("column", "min_value", "max_value", "value_set")
             and not (k == "value_set" and len(v) > 10)}
    observed = res.get("observed_value", res.get("unexpected_count"))
    return f"{cfg.type}({', '.join(f'{k}={fmt(v)}' for k, v in shown.items())}) observed {fmt(observed)}"


def _pass_file(kind: str, data_hash: str) -> Path:
    from importlib.metadata import version

    from .lineage import code_hash  # here, not above: the data stages, which never remember, stay off it
    contract = code_hash((f"tasks/kinds/{kind}", "tasks/kinds/base.py", "tasks/platform/validation.py"))
    key = hashlib.sha256(f"{kind}|{data_hash}|{contract}|{version('great-expectations')}".encode()).hexdigest()
    return PASSES / f"{kind}-{key[:32]}.json"


def passed_before(kind: str, data_hash: str) -> bool:
    """Whether data with this content hash passed the `kind` contract as the code stands now."""
    return _pass_file(kind, data_hash).is_file()


def remember_pass(kind: str, data_hash: str, data_dir: str) -> None:
    write_json(_pass_file(kind, data_hash), {"kind": kind, "data": data_dir, "data_hash": data_hash})
