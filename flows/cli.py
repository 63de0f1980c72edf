"""`distillery`: the project from a user's seat.

    distillery methods                          the method registry: kind, data, models, metric, claim
    distillery run hinton_kd [--params FILE]    one method's flow (what `python -m flows.method` runs)
    distillery compare [METHOD...] [--run-ids]  the leaderboard from MLflow: roles, intervals, verdicts
    distillery report [--out FILE]              the same as one self-contained HTML file, with figures
    distillery reproduce RUN_ID                 reruns a run's commit on its recorded data, compares metrics

Profiles: `params.yaml` is the default profile, and another profile is another params file, so every
command that reads params takes `--params FILE` rather than a profile name (the per-stage profiles
inside params.yaml, `era5_profiles` and the like, choose data stages, which `dvc repro` runs).

A thin layer: the work is in tasks/platform (leaderboard, html_report, reproduce) and flows/method.py.
Each command imports what it needs inside its body, so `distillery --help` imports typer alone and
starts in a fraction of a second (tests/test_cli.py times it). Errors are one line on stderr and exit
status 1, as for every entry point here (tasks/platform/common.py `cli_main`).
"""
from __future__ import annotations

import sys
from typing import Callable, Optional

import typer

# click's plain help (rewrapped paragraphs, no rich import); one-line errors, not typer's tracebacks
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Distillery: run, compare, report and reproduce distillation methods.")

# beside the per-method metrics/<method>.json, in a directory git ignores
REPORT = "metrics/report.html"
PARAMS = typer.Option("params.yaml", "--params", help="the params file, i.e. the profile")


def _guarded(body: Callable[[], None]) -> None:
    """A StageError, OSError, SIGTERM or Ctrl-C becomes one line and its exit status (cli_main)."""
    from tasks.platform.common import cli_main
    cli_main(lambda _argv: body(), [])


def _print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A rich table; in a pipe or a file (no terminal) at its natural width rather than wrapped at 80
    columns, so each row stays one line for grep."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console() if sys.stdout.isatty() else Console(width=1000, no_color=True)
    styles = {"holds": "green", "refuted": "red", "inconclusive": "yellow", "not": "dim", "yes": "green",
              "NO": "bold red"}
    table = Table(title=title, title_justify="left", header_style="bold")
    for h in header:
        table.add_column(h, overflow="fold")
    for row in rows:
        cells = []
        for h, cell in zip(header, row):
            style = styles.get(cell.split(" ", 1)[0], "") if h in ("verdict", "ok") and cell else ""
            cells.append(Text(cell, style=style))   # Text: an interval's brackets are not markup
        table.add_row(*cells)
    console.print(table)


@app.command()
def methods(params: str = PARAMS) -> None:
    """List the declared methods and their claims.

    Each declaration in tasks/methods with its params block: kind, data stage and path, seeds,
    teacher and student models, primary metric (↑ higher is better) and claim."""
    def body() -> None:
        from tasks.platform.leaderboard import METHOD_HEADER, method_rows
        _print_table("Methods", METHOD_HEADER, method_rows(params))
    _guarded(body)


@app.command()
def run(method: str = typer.Argument(..., help="a declared method, e.g. hinton_kd"), params: str = PARAMS,
        report: Optional[str] = typer.Option(None, "--report", help="default: metrics/<method>.json"),
        ) -> None:
    """Run one method's flow.

    Train, distil, evaluate against the baselines, check the claim over seeds, register the models
    and write metrics/<method>.json, all tracked in MLflow (what `python -m flows.method` runs)."""
    def body() -> None:
        from flows.method import main
        main([method, "--params", params, *(["--report", report] if report else [])])
    _guarded(body)


@app.command()
def compare(methods: Optional[list[str]] = typer.Argument(None, help="default: every declared method"),
            run_ids: bool = typer.Option(False, "--run-ids", help="also list the run of each role and seed"),
            params: str = PARAMS) -> None:
    """Print the leaderboard of the methods' latest runs.

    For each method's latest finished flow run: each role's primary metric (mean and 95% interval
    over seeds), recorded costs (FLOPs, latency) and the claim's verdict and parts. Reads MLflow at
    MLFLOW_TRACKING_URI, else params' tracking_uri; a method without a finished run is "not run"."""
    def body() -> None:
        from tasks.platform import leaderboard as lb
        uri = lb.tracking_uri(params)
        results = lb.collect(lb.check_methods(methods or []), uri)
        _print_table(f"Leaderboard ({_redact(uri)})", lb.LEADERBOARD_HEADER, lb.leaderboard_rows(results))
        claims = lb.claim_rows(results)
        if claims:
            _print_table("Claims: differences paired by seed", lb.CLAIM_HEADER, claims)
        if run_ids:
            _print_table("Runs", lb.RUN_HEADER, lb.run_rows(results))
        for r in results:
            if r.source == "child runs":
                print(f"note: {r.method}: no readable report.json on run {r.parent_run_id}; scores rebuilt "
                      f"from its child runs (a role trained in another method's experiment is missing)",
                      file=sys.stderr)
    _guarded(body)


@app.command()
def report(out: str = typer.Option(REPORT, "--out", help="the HTML file to write"),
           methods: Optional[list[str]] = typer.Argument(None, help="default: every declared method"),
           params: str = PARAMS) -> None:
    """Write the leaderboard as a self-contained HTML report.

    The leaderboard, the claims and each method's figures (intervals by role, learning curves, the
    kind's own plots) in one file: PNGs embedded, no external URL."""
    def body() -> None:
        from tasks.platform import html_report, leaderboard as lb
        uri = lb.tracking_uri(params)
        results = lb.collect(lb.check_methods(methods or []), uri)
        figures = {r.method: lb.run_figures(uri, r) for r in results}
        html_report.write(out, html_report.render(results, figures, _redact(uri)))
        print(f"wrote {out} ({sum(r.ran for r in results)} of {len(results)} methods run)")
    _guarded(body)


@app.command()
def reproduce(run_id: str = typer.Argument(..., help="a run of a role and seed (not the flow's parent run)"),
              params: str = PARAMS) -> None:
    """Rerun a recorded run and check its metrics.

    Checks the run's commit out in a temporary git worktree, restores its recorded data from the DVC
    cache, reruns its method there into a tracking store of its own, and compares each test_* metric
    with the rerun's same role and seed within the run's `distillery.reproduce_tolerance` tag
    (default 1e-6). Exit status 0 when all match, 1 if not."""
    def body() -> None:
        from tasks.platform import leaderboard as lb
        from tasks.platform import reproduce as rp
        result = rp.reproduce(run_id, lb.tracking_uri(params), log=lambda line: print(line, file=sys.stderr))
        _print_table(f"Reproduction of {result.recorded.describe()}", rp.COMPARISON_HEADER,
                     rp.comparison_rows(result))
        print(result.summary())
        if not result.matches:
            sys.exit(1)
    _guarded(body)


def _redact(uri: str) -> str:
    from tasks.platform.tracking import redact
    return redact(uri)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
