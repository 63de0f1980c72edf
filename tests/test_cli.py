"""The `distillery` command line (flows/cli.py) on small stores built here with the flow's own
recording steps: start-up time, the method list, the leaderboard's numbers against an independent
t interval, the HTML report, reproduce's checks and clean-up, and one-line errors.

The whole pipeline's `compare`, `report` and a real `reproduce` (a rerun of a method) are in
tests/test_cli_e2e.py: a rerun trains, which is too slow for this file."""
import dataclasses
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from scipy import stats
from typer.testing import CliRunner

from conftest import REPO, copy_checkout

DISTILLERY = Path(sys.executable).parent / "distillery"   # the [project.scripts] entry point

# test accuracy by (role, seed) of the flows recorded below
HINTON = {("teacher", 0): 0.981, ("student_kd", 0): 0.912, ("student_kd", 1): 0.934, ("student_kd", 2): 0.921,
          ("student_labels", 0): 0.903, ("student_labels", 1): 0.941, ("student_labels", 2): 0.917}
TERNGRAD = {("teacher", 0): 0.990, ("teacher", 1): 0.985, ("teacher", 2): 0.993,
            ("student_labels", 0): 0.984, ("student_labels", 1): 0.979, ("student_labels", 2): 0.990}
BYTES = {"teacher": 376_000.0, "student_labels": 23_600.0}   # terngrad's measured comm_bytes_per_step


def record_flow(params, method, accuracy, measured=None, fail=False):
    """What flows/method.py records for `method`, through its own steps: a parent run, a child run
    per (role, seed) with test_accuracy, a learning curve on the first, the claim checked over the
    seeds and the report logged (tasks/steps/report.py). Returns the report and the context."""
    from tasks.methods import get_method
    from tasks.platform import tracking
    from tasks.steps.claims import by_role, check_claims
    from tasks.steps.report import build_report, log_report

    spec = get_method(method)
    ctx = tracking.experiment_context(method, params, {"git_commit": "0" * 40, "data_dir": "data/digits"})
    with tracking.parent_run(ctx, method, tags={"method": method, "role": "flow"}) as parent_id:
        ctx = dataclasses.replace(ctx, parent_run_id=parent_id)
        if fail:
            raise RuntimeError("a flow that failed half-way")
        evaluations = []
        for (role, seed), acc in accuracy.items():
            tags = {"method": method, "role": role, "seed": seed}
            with tracking.run(ctx, f"{role}-seed{seed}", tags=tags) as rid:
                if not evaluations:
                    tracking.log_learning_curve([{"epoch": 1, "train_loss": 1.0, "val_accuracy": 0.5},
                                                 {"epoch": 2, "train_loss": 0.5, "val_accuracy": acc}], role)
            tracking.log_metrics(rid, {"test_accuracy": acc}, ctx)
            evaluations.append({"role": role, "seed": seed, "run_id": rid,
                                "metrics": {"accuracy": acc, **({"comm_bytes_per_step": measured[role]}
                                                                 if measured else {})}})
        report = build_report(spec, evaluations, check_claims(spec.claims, by_role(evaluations)), {}, ctx,
                              {"seeds": sorted({s for _, s in accuracy})})
        log_report(report, ctx)
    return report, ctx


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """hinton_kd with its report.json; terngrad whose report.json artifact is gone (rebuilt from its
    child runs); fitnet_hint whose only flow run failed; every other method never ran."""
    tmp = tmp_path_factory.mktemp("store")
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    params = {"tracking_uri": f"sqlite:///{tmp}/mlflow.db", "artifact_root": str(tmp / "artifacts")}
    hinton, _ = record_flow(params, "hinton_kd", HINTON)
    terngrad, ctx = record_flow(params, "terngrad", TERNGRAD, measured=BYTES)
    (artifact,) = (tmp / "artifacts" / "terngrad").glob(f"{ctx.parent_run_id}/artifacts/report.json")
    artifact.unlink()
    with pytest.raises(RuntimeError):
        record_flow(params, "fitnet_hint", HINTON, fail=True)
    if saved is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved
    return {"uri": params["tracking_uri"], "hinton_kd": hinton, "terngrad": terngrad, "dir": tmp}


def cli(*args, env=None, cwd=None):
    """The command in this process (typer's runner), with stdout and stderr apart."""
    from flows.cli import app
    old = os.getcwd()
    try:
        if cwd:
            os.chdir(cwd)
        return CliRunner().invoke(app, list(args), env=env)
    finally:
        os.chdir(old)


def t_interval_by_hand(values):
    """The 95% Student-t interval of the mean, from scipy's t distribution: not the code's own."""
    n, mean = len(values), statistics.fmean(values)
    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean + half


def values(table, role):
    return [v for (r, _), v in sorted(table.items()) if r == role]


def table_rows(stdout):
    """The cells of each row of the tables the command printed."""
    return [[c.strip() for c in line.split("│")[1:-1]] for line in stdout.splitlines()
            if line.startswith("│")]


# ---------------------------------------------------------------------------------------------------
# start-up and the method list

def test_help_starts_in_well_under_a_second():
    assert DISTILLERY.is_file(), f"{DISTILLERY} missing: install the project (`pip install -e .`)"
    times = []
    for _ in range(3):   # the best of three: one slow start on a loaded machine is not the CLI's
        start = time.perf_counter()
        proc = subprocess.run([str(DISTILLERY), "--help"], capture_output=True, text=True, timeout=60)
        times.append(time.perf_counter() - start)
        assert proc.returncode == 0 and "compare" in proc.stdout and "reproduce" in proc.stdout
    print(f"distillery --help: {', '.join(f'{t:.3f} s' for t in times)} (target < 1 s)")
    assert min(times) < 2.0


def test_the_cli_module_imports_no_heavy_package():
    code = ("import sys, flows.cli; heavy = ('torch', 'mlflow', 'prefect', 'tasks', 'rich', 'dvc'); "
            "print(sorted(m for m in heavy if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_methods_lists_each_declared_method_with_its_claim():
    result = cli("methods", "--params", str(REPO / "params.yaml"))
    assert result.exit_code == 0, result.stderr
    rows = {row[0]: row for row in table_rows(result.stdout) if row[0]}   # a claim's next parts: no name
    from tasks.methods import list_methods
    assert set(list_methods()) <= set(rows)
    assert rows["hinton_kd"] == ["hinton_kd", "classification", "digits: data/digits", "0, 1, 2, 3, 4",
                                 "digits_cnn", "digits_mlp_tiny", "accuracy ↑",
                                 "student_kd.accuracy > student_labels.accuracy"]
    assert "student_labels.comm_bytes_per_step <= 0.125 * teacher.comm_bytes_per_step" in result.stdout


# ---------------------------------------------------------------------------------------------------
# compare

def test_leaderboard_numbers_match_an_independent_t_interval(store):
    from tasks.platform import leaderboard as lb
    methods = ["hinton_kd", "terngrad", "fitnet_hint", "pangu"]
    results = {r.method: r for r in lb.collect(methods, store["uri"])}
    assert not results["fitnet_hint"].ran and not results["pangu"].ran   # failed only; never ran

    hinton = results["hinton_kd"]
    assert hinton.source == "report.json"
    assert [r.role for r in hinton.roles] == ["teacher", "student_kd", "student_labels"]
    for role in hinton.roles:
        expected = values(HINTON, role.role)
        assert role.mean == pytest.approx(statistics.fmean(expected))
        if len(expected) == 1:
            assert role.ci95 is None
        else:
            assert role.ci95 == pytest.approx(t_interval_by_hand(expected))
        assert sorted(role.run_ids) == [s for (r, s) in sorted(HINTON) if r == role.role]
    assert hinton.claim["verdict"] == store["hinton_kd"]["claim"]["verdict"]
    paired = [a - b for a, b in zip(values(HINTON, "student_kd"), values(HINTON, "student_labels"))]
    assert hinton.claim["parts"][0]["ci95"] == pytest.approx(t_interval_by_hand(paired))

    terngrad = results["terngrad"]   # its report.json is gone: rebuilt from child runs and parent tags
    assert terngrad.source == "child runs"
    for role in terngrad.roles:
        assert role.ci95 == pytest.approx(t_interval_by_hand(values(TERNGRAD, role.role)))
    recorded = store["terngrad"]["claim"]
    assert terngrad.claim["verdict"] == recorded["verdict"]
    assert [(p["statement"], p["verdict"]) for p in terngrad.claim["parts"]] == [
        (p["statement"], p["verdict"]) for p in recorded["parts"]]
    for part, logged in zip(terngrad.claim["parts"], recorded["parts"]):
        assert part["ci95"] == pytest.approx(logged["ci95"])
        assert part["diff_mean"] == pytest.approx(logged["diff_mean"])


def test_compare_prints_a_row_per_role_verdicts_and_not_run(store, tmp_path):
    result = cli("compare", "hinton_kd", "terngrad", "fitnet_hint", "--run-ids",
                 env={"MLFLOW_TRACKING_URI": store["uri"]}, cwd=tmp_path)   # no params.yaml needed there
    assert result.exit_code == 0, result.stderr
    rows = table_rows(result.stdout)
    kd = statistics.fmean(values(HINTON, "student_kd"))
    lo, hi = t_interval_by_hand(values(HINTON, "student_kd"))
    assert ["", "student_kd", "", "3", f"{kd:.4g}", f"[{lo:.4g}, {hi:.4g}]", "", ""] in rows
    verdict = store["hinton_kd"]["claim"]["verdict"]
    assert ["hinton_kd", "teacher", "accuracy ↑", "1", "0.981", "—", "", verdict] in rows
    assert ["fitnet_hint", "—", "—", "", "", "", "", "not run"] in rows
    assert any(r[0] == "terngrad" and r[-1].startswith(store["terngrad"]["claim"]["verdict"]) for r in rows)
    assert result.stderr.startswith("note: terngrad: no readable report.json on run ")
    for run_id in store["hinton_kd"]["mlflow"]["runs"].values():   # --run-ids
        assert run_id in result.stdout


def test_compare_in_a_store_that_does_not_exist_lists_every_method_as_not_run(tmp_path):
    result = cli("compare", env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/none.db"}, cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    from tasks.methods import list_methods
    assert result.stdout.count("not run") == len(list_methods())
    assert not (tmp_path / "none.db").exists()   # reading never creates a store


def test_the_installed_command_prints_the_leaderboard(store, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"]}
    proc = subprocess.run([str(DISTILLERY), "compare", "hinton_kd"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"│ hinton_kd\s+│ teacher\s+│ accuracy ↑", proc.stdout)
    assert "Downloading artifacts" not in proc.stderr   # no progress bars


# ---------------------------------------------------------------------------------------------------
# report

class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls, self.tables, self.cells, self.images = [], 0, [], []
        self._in_cell = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.urls += [v for k, v in attrs.items() if k in ("src", "href") and v]
        self.tables += tag == "table"
        self._in_cell = tag in ("td", "th") or self._in_cell
        if tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in_cell = False

    def handle_data(self, data):
        if self._in_cell and data.strip():
            self.cells.append(data.strip())


def test_report_is_one_self_contained_html_file(store, tmp_path):
    import base64
    out = tmp_path / "reports" / "index.html"
    result = cli("report", "--out", str(out), env={"MLFLOW_TRACKING_URI": store["uri"]}, cwd=tmp_path)
    assert result.exit_code == 0, result.stderr
    assert os.listdir(out.parent) == ["index.html"]   # no temporary left beside it
    page = Page()
    page.feed(out.read_text(encoding="utf-8"))
    page.close()
    assert page.tables >= 3   # leaderboard, claims, runs
    assert all(u.startswith("data:image/png;base64,") for u in page.urls), page.urls   # nothing external
    pngs = [base64.b64decode(u.split(",", 1)[1]) for u in page.images]
    assert pngs and all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    # an interval plot per method that ran, and the learning curve logged on each first run
    assert len(pngs) == 2 + 2
    kd = statistics.fmean(values(HINTON, "student_kd"))
    lo, hi = t_interval_by_hand(values(HINTON, "student_kd"))
    assert {"hinton_kd", "student_kd", f"{kd:.4g}", f"[{lo:.4g}, {hi:.4g}]", "not run"} <= set(page.cells)
    for run_id in store["hinton_kd"]["mlflow"]["runs"].values():
        assert run_id in page.cells


def test_a_failed_report_write_leaves_the_previous_report_and_no_temporary(tmp_path):
    from tasks.platform import html_report
    out = tmp_path / "index.html"
    html_report.write(out, "<p>previous</p>")
    with pytest.raises(UnicodeEncodeError):
        html_report.write(out, "<p>\ud800</p>")   # a lone surrogate cannot be encoded: fails mid-write
    assert out.read_text() == "<p>previous</p>" and os.listdir(tmp_path) == ["index.html"]


# ---------------------------------------------------------------------------------------------------
# reproduce: the checks before any rerun, the clean-up, the comparison

GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@localhost"}


def git(root, *args):
    return subprocess.run(["git", *args], cwd=root, env={**os.environ, **GIT_ENV}, capture_output=True,
                          text=True, check=True).stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A committed copy of this checkout with an empty DVC cache (no `dvc repro` ran in it)."""
    root = copy_checkout(tmp_path_factory.mktemp("repo"))
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-qm", "test")
    return root, git(root, "rev-parse", "HEAD").strip()


def recorded_student_run(store_uri, commit, artifact_root):
    """A student run as a flow records it, from `commit` on data/digits."""
    from tasks.platform import tracking
    from tasks.platform.lineage import dvc_lock_md5
    lineage = {"git_commit": commit, "git_dirty": "false", "data_dir": "data/digits", "data_sha256": "0" * 64,
               "dvc_lock_md5": dvc_lock_md5("data/digits", REPO / "dvc.lock") or "none"}
    params = {"tracking_uri": store_uri, "artifact_root": artifact_root}
    ctx = tracking.experiment_context("hinton_kd", params, lineage)
    tags = {"method": "hinton_kd", "role": "student_kd", "seed": 0}
    with tracking.run(ctx, "student_kd-seed0", tags=tags) as rid:
        pass
    tracking.log_metrics(rid, {"test_accuracy": 0.93, "test_loss": 0.25}, ctx)
    return rid


def worktrees(root):
    return [line for line in git(root, "worktree", "list", "--porcelain").splitlines()
            if line.startswith("worktree ")]


def leftovers():
    return set(Path(tempfile.gettempdir()).glob("distillery-reproduce-*"))


def test_reproduce_says_in_one_line_when_the_data_is_in_no_cache(repo, tmp_path, monkeypatch):
    from tasks.platform.lineage import dvc_lock_md5
    root, head = repo
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = recorded_student_run(uri, head, str(tmp_path / "artifacts"))
    before = leftovers()
    result = cli("reproduce", run_id, env={"MLFLOW_TRACKING_URI": uri}, cwd=root)
    assert result.exit_code == 1
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    md5 = dvc_lock_md5("data/digits", root / "dvc.lock")
    assert error == [f"error: data/digits: not in the DVC cache {root}/.dvc/cache (md5 {md5}), and no DVC "
                     f"remote is configured to pull it from"], result.stderr
    assert "Traceback" not in result.stderr
    assert worktrees(root) == [f"worktree {root}"] and leftovers() == before   # all cleaned up


def test_reproduce_refuses_a_commit_this_repository_lacks_and_an_unknown_run(repo, tmp_path, monkeypatch):
    root, _ = repo
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_id = recorded_student_run(uri, "f" * 40, str(tmp_path / "artifacts"))
    result = cli("reproduce", run_id, env={"MLFLOW_TRACKING_URI": uri}, cwd=root)
    assert result.exit_code == 1
    assert result.stderr.strip() == (f"error: {root}: commit {'f' * 40} (run {run_id}'s "
                                     f"distillery.git_commit) is not in this repository; fetch it, or run "
                                     f"from the clone the run came from")
    result = cli("reproduce", "0123456789abcdef", env={"MLFLOW_TRACKING_URI": uri}, cwd=root)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {uri}: no run '0123456789abcdef' in this tracking store"


def test_the_worktree_goes_on_ctrl_c(repo):
    from tasks.platform.reproduce import worktree
    root, head = repo
    with pytest.raises(KeyboardInterrupt):
        with worktree(root, head) as wt:
            assert (wt / "params.yaml").is_file() and len(worktrees(root)) == 2
            raise KeyboardInterrupt
    assert not wt.exists() and not wt.parent.exists() and worktrees(root) == [f"worktree {root}"]


RECORDED = {"test_accuracy": 0.93, "test_loss": 0.25}


def reproduction(tolerance, reproduced):
    """A reproduction of RECORDED as `reproduced`; the params differ when the metrics do."""
    from tasks.platform.reproduce import Comparison, RecordedRun, Reproduction
    run = RecordedRun(run_id="r1", method="hinton_kd", role="student_kd", seed=0, unit="", commit="c" * 40,
                      dirty=False, data_dir="data/digits", data_sha256="", dvc_lock_md5="none",
                      tolerance=tolerance, metrics=RECORDED)
    changed = {"train.epochs": ("2", "3")} if reproduced != RECORDED else {}
    comparisons = [Comparison(k, v, reproduced.get(k)) for k, v in RECORDED.items()]
    return Reproduction(run, "r2", comparisons, changed)


@pytest.mark.parametrize("tolerance,accuracy,loss,status,summary", [
    (1e-6, 0.93, 0.25, 0, "match: all 2 test metrics"),
    (1e-3, 0.9305, 0.25, 0, "match: all 2 test metrics"),
    (1e-6, 0.9305, 0.25, 1, "MISMATCH: 1 of 2 test metrics beyond 1e-06 (worst test_accuracy, "
                            "|diff| 0.0005); params differ: train.epochs 2 -> 3"),
    (1e-6, 0.93, None, 1, "MISMATCH: 1 of 2 test metrics beyond 1e-06 (worst test_loss, "
                          "missing from the rerun)"),
])
def test_reproduce_exit_status_and_table_say_whether_metrics_match(monkeypatch, tolerance, accuracy, loss,
                                                                   status, summary):
    from tasks.platform import reproduce as rp
    reproduced = {"test_accuracy": accuracy, **({"test_loss": loss} if loss is not None else {})}
    monkeypatch.setattr(rp, "reproduce", lambda *a, **k: reproduction(tolerance, reproduced))
    result = cli("reproduce", "r1", env={"MLFLOW_TRACKING_URI": "sqlite:///unused.db"})
    assert result.exit_code == status, result.stdout
    assert summary in result.stdout
    diff = abs(accuracy - 0.93)
    assert ["test_accuracy", "0.93", repr(accuracy), f"{diff:.3g}", "yes" if diff <= tolerance else "NO"] in \
        table_rows(result.stdout)


def test_the_tolerance_tag():
    from tasks.platform.common import StageError
    from tasks.platform.reproduce import DEFAULT_TOLERANCE, tolerance
    assert tolerance(None, "run") == DEFAULT_TOLERANCE == 1e-6 and tolerance("0.001", "run") == 0.001
    for bad in ("abc", "-1", "nan"):
        with pytest.raises(StageError):
            tolerance(bad, "run")


# ---------------------------------------------------------------------------------------------------
# errors: one line, status 1

def test_unknown_method_is_one_line_and_status_1(store, tmp_path):
    result = cli("compare", "hinton_kd", "nosuch", env={"MLFLOW_TRACKING_URI": store["uri"]}, cwd=tmp_path)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("error: tasks/methods: unknown method 'nosuch'; declared: fitnet_hint, ")
    assert len(result.stderr.splitlines()) == 1
    params = REPO / "params.yaml"
    result = cli("run", "nosuch", "--params", str(params))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {params}: methods.nosuch: no such method in params.yaml")
    assert len(result.stderr.splitlines()) == 1


def test_a_missing_params_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = cli("compare", cwd=tmp_path)
    assert result.exit_code == 1 and result.stderr.strip() == "error: params.yaml: params file not found"
