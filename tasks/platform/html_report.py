"""`distillery report`: the leaderboard as one self-contained HTML file.

Everything is inside the file: tables as HTML, figures as base64 PNG `data:` URIs, CSS inline, no
script and no external URL, so it opens offline and can be mailed or attached to a ticket as it is.
Per method: each role's primary metric with its 95% interval over seeds (drawn here), then the
figures the flow logged (learning curves, the kind's own plots), copied from MLflow.
"""
from __future__ import annotations

import base64
import html
import io
import os
from datetime import datetime, timezone
from typing import Iterable

from .common import atomic_path
from .leaderboard import (CLAIM_HEADER, LEADERBOARD_HEADER, NOT_RUN, RUN_HEADER, MethodResult, claim_rows,
                          leaderboard_rows, run_rows, verdict_text)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.nowrap { white-space: nowrap; } tr.method td { border-top: 2px solid #888; }
.holds { color: #1a7f37; font-weight: 600; } .refuted { color: #b42318; font-weight: 600; }
.inconclusive { color: #9a6700; font-weight: 600; } .not-run { color: #888; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; } figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; }
"""
NUMERIC = {"n", "mean", "95% interval", "seed", "value", "mean difference"}
NOWRAP = {"method", "role", "metric", "run id"}


def interval_plot(result: MethodResult) -> bytes:
    """Each role's mean of the primary metric over seeds with its 95% interval as a bar; a role with
    one value (a deterministic baseline, a single teacher) is a diamond without one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    roles = list(reversed(result.roles))   # the first role on top
    fig = Figure(figsize=(6.4, 0.9 + 0.45 * len(roles)))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for y, role in enumerate(roles):
        ci = role.ci95
        if ci is None:
            ax.plot([role.mean], [y], "D", color="tab:gray")
        else:
            ax.errorbar([role.mean], [y], xerr=[[role.mean - ci[0]], [ci[1] - role.mean]], fmt="o",
                        color="tab:blue", capsize=4)
        ax.plot(list(role.values.values()), [y] * role.n, ".", color="tab:blue", alpha=0.35)
    ax.set_yticks(range(len(roles)), [f"{r.role} (n={r.n})" for r in roles])
    ax.set_ylim(-0.6, len(roles) - 0.4)
    better = "higher" if result.higher_is_better else "lower"
    ax.set_xlabel(f"test {result.primary_metric} ({better} is better): mean, 95% interval, seeds")
    ax.grid(axis="x", alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(6))   # small scores (mAP ~ 1e-3) crowd the default ticks
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def render(results: list[MethodResult], figures: dict[str, list[tuple[str, bytes]]], tracking_uri: str,
           generated: datetime | None = None) -> str:
    """The whole page: the leaderboard, the claims, then a section per method with its figures."""
    generated = generated or datetime.now(timezone.utc)
    parts = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>Distillery: methods compared</title>", f"<style>{STYLE}</style></head><body>",
        "<h1>Distillery: methods compared</h1>",
        f"<p>Each method's latest finished flow run in <code>{_e(tracking_uri)}</code>, read "
        f"{generated:%Y-%m-%d %H:%M} UTC. A role's interval is the two-sided 95% Student-t interval of its "
        "mean over seeds (none for one value); a claim's is that of the differences paired by seed, and its "
        "verdict says on which side of zero the interval lies.</p>",
        "<h2>Leaderboard</h2>", _table(LEADERBOARD_HEADER, leaderboard_rows(results)),
        "<h2>Claims</h2>", _table(CLAIM_HEADER, claim_rows(results)),
    ]
    for r in results:
        parts.append(f'<h2 id="{_e(r.method)}">{_e(r.method)}</h2>')
        if not r.ran:
            parts.append(f'<p class="not-run">{NOT_RUN}: no finished flow run in this store.</p>')
            continue
        claim_parts = (r.claim or {}).get("parts", [])
        statement = (f"<code>{_e(claim_parts[0]['statement'])}</code>" if len(claim_parts) == 1
                     else f"of {len(claim_parts)} parts (see Claims)")
        commit = r.git_commit or "unknown"
        parts.append(f"<p>Claim {statement}: {_verdict(verdict_text(r.claim))}. Flow run "
                     f"<code>{_e(r.parent_run_id)}</code> (experiment {_e(r.experiment_id)}, commit "
                     f"<code>{_e(commit)}</code>, scores from {_e(r.source)}).</p>")
        if r.roles:
            parts.append(_figure(f"{r.method}: test {r.primary_metric} by role", interval_plot(r)))
        parts.extend(_figure(title, png) for title, png in figures.get(r.method, []))
    parts.append("<h2>Runs</h2><details><summary>the run of each role and seed</summary>")
    parts.append(_table(RUN_HEADER, run_rows(results)) + "</details>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write(path: str | os.PathLike, page: str) -> None:
    """Atomically: a reader sees the previous report or the new one, never half of one."""
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _table(header: list[str], rows: Iterable[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for h, cell in zip(header, row):
            if h == "verdict":
                cells.append(f"<td>{_verdict(cell)}</td>")
            else:
                css = ' class="num"' if h in NUMERIC else ' class="nowrap"' if h in NOWRAP else ""
                cells.append(f"<td{css}>{_e(cell)}</td>")
        first = ' class="method"' if row[0] else ""   # a method's first row: a line above its group
        body.append(f"<tr{first}>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _verdict(text: str) -> str:
    """A verdict cell, coloured by the verdict it starts with."""
    word = text.split(" ", 1)[0] if text else ""
    css = {"holds": "holds", "refuted": "refuted", "inconclusive": "inconclusive", "not": "not-run"}.get(word)
    return f'<span class="{css}">{_e(text)}</span>' if css else _e(text)


def _figure(title: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{_e(title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(title)}</figcaption></figure>")
