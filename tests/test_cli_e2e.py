"""`distillery compare`, `report` and `reproduce` on the whole pipeline's store, as a user would run
them in the checkout after `make run` (the `pipeline` fixture: tests/e2e_pipeline.py)."""
import json
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from e2e_pipeline import sh

pytestmark = pytest.mark.e2e


def distillery(root, env, *args, timeout=600):
    """The command line of the copy under test (its own flows/cli.py), in its root."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout)


def table_rows(stdout):
    return [[c.strip() for c in line.split("│")[1:-1]] for line in stdout.splitlines() if line.startswith("│")]


def test_compare_has_a_row_per_method_with_the_verdict_of_its_metrics_file(pipeline):
    root, env, _ = pipeline
    proc = distillery(root, env, "compare")
    assert proc.returncode == 0, proc.stderr
    header = ["method", "role", "metric", "n", "mean", "95% interval", "cost (seed mean)", "verdict"]
    first_rows = {r[0]: dict(zip(header, r)) for r in table_rows(proc.stdout) if r[0] and r[1] in ("teacher", "—")}
    reports = {p.stem: json.loads(p.read_text()) for p in (root / "metrics").glob("*.json")}
    assert reports, "the pipeline wrote no metrics/<method>.json"
    for method, report in reports.items():
        row = first_rows[method]
        assert row["verdict"].split(" ")[0] == report["claim"]["verdict"], (method, row)
        assert row["mean"] == f"{report['roles']['teacher']['mean']:.4g}"
        assert row["n"] == str(report["roles"]["teacher"]["n"])
    ran_nothing = set(first_rows) - set(reports)
    assert all(first_rows[m]["verdict"] == "not run" for m in ran_nothing)
    if "sps_conv" in reports:   # detection records its costs: FLOPs and latency
        assert "backbone_gflops" in first_rows["sps_conv"]["cost (seed mean)"]


def test_report_writes_one_self_contained_html_file(pipeline):
    root, env, _ = pipeline
    proc = distillery(root, env, "report")
    assert proc.returncode == 0, proc.stderr
    page = (root / "metrics" / "report.html").read_text(encoding="utf-8")

    class Urls(HTMLParser):
        urls: list = []

        def handle_starttag(self, tag, attrs):
            self.urls += [v for k, v in attrs if k in ("src", "href") and v]

    parser = Urls()
    parser.feed(page)
    assert parser.urls and all(u.startswith("data:image/png;base64,") for u in parser.urls)
    for method in (p.stem for p in (root / "metrics").glob("*.json")):
        assert f'<h2 id="{method}">' in page


def test_reproduce_the_hinton_kd_champion_run(pipeline):
    from mlflow.tracking import MlflowClient
    root, env, _ = pipeline
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    run_id = client.get_model_version_by_alias("hinton_kd", "champion").run_id
    runs = {r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])}
    before = set(Path(tempfile.gettempdir()).glob("distillery-reproduce-*"))
    proc = distillery(root, env, "reproduce", run_id, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "match: all" in proc.stdout and "test_accuracy" in proc.stdout
    assert all(r[-1] == "yes" for r in table_rows(proc.stdout))
    # the worktree and its temporary directory are gone; the user's store saw no new run
    assert sh("git worktree list --porcelain", root, env).stdout.count("worktree ") == 1
    assert set(Path(tempfile.gettempdir()).glob("distillery-reproduce-*")) == before
    assert {r.info.run_id for r in client.search_runs([e.experiment_id for e in client.search_experiments()])} == runs
