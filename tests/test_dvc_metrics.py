"""What `dvc metrics show` and `dvc plots show` read (tasks/steps/report.py, dvc.yaml): the summary, the
learning curves and the kind's score charts written beside the full report, against values computed
here from the inputs; the histories read back from a real MLflow store; and real DVC commands in a
small repository with the project's entries, where one of two methods has run: no warning, a handful
of columns, no run ids."""
import json
import os
import re
import statistics
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO
from tasks.kinds import register_kind
from tasks.methods import Claim
from tasks.platform import tracking
from tasks.steps import report as rp
from tasks.steps.claims import by_role, check_claims
from tasks.steps.plan import RECIPES, plan

DVC = [sys.executable, "-m", "dvc"]
SEEDS = (0, 1, 2)
# the seeds each role of the synthetic method is evaluated on (a distill recipe's, and a baseline)
ROLE_SEEDS = {"teacher": (0,), "persistence": (0,), "student_kd": SEEDS, "student_labels": SEEDS}
CLAIMS = [Claim.parse("student_kd.accuracy > student_labels.accuracy"),
          Claim.parse("teacher.err_24h < persistence.err_24h")]


def bars_score_chart(metric):
    """The test kind's charts: err_<h>h per lead time, ap_<class> per class."""
    if m := re.fullmatch(r"err_(\d+)h", metric):
        return "err_by_lead_h", int(m[1])
    if metric.startswith("ap_"):
        return "ap_by_class", metric.removeprefix("ap_")
    return None


register_kind(SimpleNamespace(name="test_bars", score_chart=bars_score_chart))


def metrics_of(role, seed):
    """Distinct, exactly representable values per role and seed."""
    base = {"teacher": 0.5, "student_labels": 0.25, "student_kd": 0.375, "persistence": 0.125}[role]
    return {"accuracy": base + seed / 64, "err_6h": 2 * base + seed, "err_24h": 4 * base + seed,
            "ap_car": base / 2 + seed / 128, "ap_cyclist": base / 4}


def synthetic_report(method="a", kind="test_bars"):
    evaluations = [{"role": role, "seed": seed, "run_id": f"{role}{seed}".ljust(32, "0"),
                    "metrics": metrics_of(role, seed), "model_uri": None}
                   for role, seeds in ROLE_SEEDS.items() for seed in seeds]
    spec = SimpleNamespace(name=method, primary_metric="accuracy", higher_is_better=True)
    ctx = tracking.RunContext("sqlite:///nowhere.db", "1", "store", parent_run_id="p" * 32)
    verdict = check_claims(CLAIMS, by_role(evaluations))
    return rp.build_report(spec, evaluations, verdict, {}, ctx, {"kind": kind, "seeds": list(SEEDS)})


def history(role, seed, epochs, val_every=2):
    """Per-epoch train_loss, val_accuracy every `val_every` epochs and at the last."""
    loss = {e: 1 / (e + seed + len(role)) for e in range(1, epochs + 1)}
    val = {e: e / 10 + seed / 100 for e in range(1, epochs + 1) if e % val_every == 0 or e == epochs}
    return {"train_loss": loss, "val_accuracy": val}


EPOCHS = {"teacher": 5, "student_kd": 4, "student_labels": 4}  # the trained roles' budgets
TRAINED = [rp.Training(role, s, None, history(role, s, epochs)) for role, epochs in EPOCHS.items()
           for s in ROLE_SEEDS[role]]


def read(path):
    return json.loads(path.read_text())


def test_the_summary_and_plot_files_hold_what_the_inputs_give(tmp_path):
    report = synthetic_report()
    path = tmp_path / "metrics" / "a.json"
    rp.write_report(report, str(path), TRAINED)
    files = rp.report_files(path)
    assert read(path) == json.loads(json.dumps(report))  # the full report, as it was

    def mean(role, metric):
        return statistics.fmean(metrics_of(role, s)[metric] for s in ROLE_SEEDS[role])

    # student_kd beats student_labels by 0.125 on every seed: holds; teacher against persistence is one
    # pair, so no interval: inconclusive; and so is the whole claim
    assert read(files["summary"]) == {"metric": "accuracy ↑", "claim": "inconclusive", "held": "1/2",
                                      "seeds": 3, **{role: mean(role, "accuracy") for role in ROLE_SEEDS}}

    learning = {p.name: read(p) for p in sorted(files["learning"].iterdir())}
    assert set(learning) == {"train_loss.json", "val_accuracy.json"}
    for quantity in ("train_loss", "val_accuracy"):
        rows = learning[f"{quantity}.json"]
        # a row for each epoch some run has a value at (validation: every 2nd and the last)
        assert [r["epoch"] for r in rows] == ([1, 2, 3, 4, 5] if quantity == "train_loss" else [2, 4, 5])
        for row in rows:
            assert set(row) == {"epoch", *rp.LEARNING_ROLES}  # the same fields in every row and file
            for role, epochs in EPOCHS.items():
                values = [history(role, s, epochs)[quantity].get(row["epoch"]) for s in ROLE_SEEDS[role]]
                if None in values:  # not trained or not validated that epoch
                    assert row[role] is None
                else:
                    assert row[role] == pytest.approx(statistics.fmean(values))

    charts = {p.name: read(p) for p in sorted(files["scores"].iterdir())}
    assert set(charts) == {"err_by_lead_h.json", "ap_by_class.json"}
    err = {row["bar"]: row["value"] for row in charts["err_by_lead_h.json"]}
    ap = {row["bar"]: row["value"] for row in charts["ap_by_class.json"]}
    assert list(err) == sorted(err)  # the labels order the bars: 06 before 24
    assert len(err) == 2 * 4 and len(ap) == 2 * 4  # a bar per x and role
    for role in ROLE_SEEDS:
        for h in (6, 24):
            assert err[f"{h:02d} · {role}"] == pytest.approx(mean(role, f"err_{h}h"))
        for cls in ("car", "cyclist"):
            assert ap[f"{cls} · {role}"] == pytest.approx(mean(role, f"ap_{cls}"))
    assert all(set(row) == {"bar", "value"} for rows in charts.values() for row in rows)


def test_a_kind_without_charts_gets_the_summary_and_learning_curves_and_an_empty_scores_directory(tmp_path):
    register_kind(SimpleNamespace(name="test_plain"))
    path = tmp_path / "a.json"
    rp.write_report(synthetic_report(kind="test_plain"), str(path), TRAINED)
    files = rp.report_files(path)
    assert files["summary"].is_file() and len(list(files["learning"].iterdir())) == 2
    assert files["scores"].is_dir() and not list(files["scores"].iterdir())


def test_numbers_label_bars_in_numeric_order_and_names_stay_names():
    assert rp.x_labels({6, 24, 1}) == {1: "01", 6: "06", 24: "24"}
    assert rp.x_labels({0.1, 0.5, 1.5, 12}) == {0.1: "00.1", 0.5: "00.5", 1.5: "01.5", 12: "12"}
    assert rp.x_labels({"car", "cyclist"}) == {"car": "car", "cyclist": "cyclist"}


def test_learning_curves_are_read_back_from_the_runs_in_mlflow(tracking_ctx):
    """Trained runs (the per-epoch metrics as the loop's EpochLogger logs them), a composed model whose
    run names its units, and a baseline without epochs."""
    ctx, runs = tracking_ctx, {}

    def trained(role, seed, unit, epochs):
        with tracking.run(ctx, f"{role}-{unit}-seed{seed}",
                          tags={"role": role, "seed": seed, **({"unit": unit} if unit else {})}) as run_id:
            log = tracking.EpochLogger(run_id, ctx)
            for e in range(1, epochs + 1):
                log({"epoch": e, "train_loss": 1 / e + seed, "epoch_seconds": 0.1,
                     **({"val_loss": e / 10} if e % 2 == 0 else {})})
            log.close()
        tracking.log_metrics(run_id, {"test_rmse": 1.0}, ctx)  # evaluation's, at step 0: not a curve
        return run_id

    units = {u: trained("teacher", 0, u, 4) for u in ("6h", "24h")}
    members = {f"member_{u}_run_id": run_id for u, run_id in units.items()}
    with tracking.run(ctx, "teacher-composed-seed0", tags={"role": "teacher", "seed": 0, **members}) as rid:
        runs["teacher/seed0"] = rid
    runs["student_labels/seed1"] = trained("student_labels", 1, None, 3)
    with tracking.run(ctx, "persistence", tags={"role": "persistence", "seed": 0}) as rid:
        runs["persistence/seed0"] = rid
    report = {"mlflow": {"tracking_uri": tracking.redact(ctx.tracking_uri), "runs": runs}}

    found = sorted(rp.trainings(report), key=lambda t: (t.role, t.unit or ""))
    assert [(t.role, t.seed, t.unit) for t in found] == [("student_labels", 1, None), ("teacher", 0, "24h"),
                                                         ("teacher", 0, "6h")]
    assert found[0].history == {"train_loss": {1: 2.0, 2: 1.5, 3: 1 / 3 + 1}, "val_loss": {2: 0.2}}
    assert found[1].history["train_loss"] == {1: 1.0, 2: 0.5, 3: 1 / 3, 4: 0.25}
    curves = rp.learning_curves(found)
    assert set(curves) == {f"{q}{u}" for q in ("train_loss", "val_loss") for u in ("", ".6h", ".24h")}
    students = {"student_labels": None, "student_kd": None}
    assert curves["val_loss.24h"] == [{"epoch": 2, "teacher": 0.2, **students},
                                      {"epoch": 4, "teacher": 0.4, **students}]


def test_the_projects_dvc_yaml_names_what_the_report_writes():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    files = rp.report_files("metrics/${key}.json")
    assert dvc["metrics"] == [str(files["summary"].parent)]
    plots = {k: v for entry in dvc["plots"] for k, v in entry.items()}
    assert plots[str(files["learning"].parent)] == {"x": "epoch", "y": list(rp.LEARNING_ROLES),
                                                    "y_label": "mean over seeds"}
    assert {k: plots[str(files["scores"].parent)][k] for k in ("template", "x", "y")} == \
        {"template": "bar_horizontal", "x": "value", "y": "bar"}
    # the learning curves have a column for every role a recipe trains
    trained = {job.role for recipe in RECIPES
               for job in plan(SimpleNamespace(recipe=recipe), [0, 1], lambda role: [None]).jobs}
    assert trained == set(rp.LEARNING_ROLES)
    # the train stage declares them all, uncached, and no metric file of its own
    train = dvc["stages"]["train"]["do"]
    outs = {k: v for entry in train["outs"] for k, v in entry.items()}
    assert outs == {p: {"cache": False} for p in ("metrics/${key}.json", *map(str, files.values()))}
    assert "metrics" not in train


def dvc(root, *args):
    env = {**os.environ, "DVC_NO_ANALYTICS": "true", "PYTHONPATH": str(REPO)}
    return subprocess.run([*DVC, *args], cwd=root, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def two_methods(tmp_path_factory):
    """A git + DVC repository with the project's top-level `metrics:`/`plots:` and train outputs, two
    methods of the same shape, and `dvc repro train@ran` run (train@not_run never)."""
    root = tmp_path_factory.mktemp("two_methods")
    project = yaml.safe_load((REPO / "dvc.yaml").read_text())
    train = project["stages"]["train"]["do"]
    (root / "params.yaml").write_text(yaml.safe_dump({"methods": {"ran": {"kind": "test_bars"},
                                                                  "not_run": {"kind": "test_bars"}}}))
    (root / "dvc.yaml").write_text(yaml.safe_dump({
        "stages": {"train": {"foreach": "${methods}", "do": {
            "cmd": f"{sys.executable} write_report.py ${{key}}", "deps": ["write_report.py", "inputs.json"],
            "params": ["methods.${key}"], "outs": train["outs"]}}},
        "metrics": project["metrics"], "plots": project["plots"]}, sort_keys=False, allow_unicode=True))
    (root / "inputs.json").write_text(json.dumps({
        "report": synthetic_report("ran"),
        "trained": [vars(t) for t in TRAINED]}))
    (root / "write_report.py").write_text(
        "import json, sys\n"
        "sys.path[:0] = [%r, %r]\n"
        "import test_dvc_metrics  # registers the test kind\n"
        "from tasks.steps.report import Training, write_report\n"
        "inputs = json.load(open('inputs.json'))\n"
        "trained = [Training(t['role'], t['seed'], t['unit'], {q: {int(e): v for e, v in h.items()}\n"
        "           for q, h in t['history'].items()}) for t in inputs['trained']]\n"
        "report = dict(inputs['report'], method=sys.argv[1])\n"
        "write_report(report, f'metrics/{sys.argv[1]}.json', trained)\n" % (str(REPO / "tests"), str(REPO)))
    (root / ".gitignore").write_text("/metrics/\n")  # as in the project: metrics/ is not committed
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    assert dvc(root, "init", "-q").returncode == 0
    done = dvc(root, "repro", "train@ran")
    assert done.returncode == 0, done.stderr
    return root


def test_dvc_warns_for_each_declared_metric_file_that_is_missing(tmp_path):
    """Why dvc.yaml names directories: the stage-level `metrics:` entry the train stage used to have
    makes DVC 3 warn for every method not run yet (dvc/repo/metrics/show.py reads each declared file)."""
    stages = {m: {"cmd": "true", "metrics": [{f"metrics/{m}.json": {"cache": False}}]}
              for m in ("ran", "not_run")}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "ran.json").write_text('{"accuracy": 0.9}')
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    assert dvc(tmp_path, "init", "-q").returncode == 0
    shown = dvc(tmp_path, "metrics", "show")
    assert "DVC failed to load some metrics" in shown.stderr


def test_dvc_metrics_show_lists_the_method_that_ran_quietly_in_a_few_columns(two_methods):
    shown = dvc(two_methods, "metrics", "show")
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr  # no "failed to load" warning
    header, *rows = shown.stdout.strip().splitlines()
    assert header.split() == ["Path", "claim", "held", "metric", "persistence", "seeds", "student_kd",
                              "student_labels", "teacher"]
    assert [r.split()[0] for r in rows] == ["metrics/summary/ran.json"]
    assert not re.search(r"[0-9a-f]{32}", shown.stdout)  # no run ids


def test_dvc_plots_show_reads_every_plot_of_the_method_that_ran(two_methods):
    shown = dvc(two_methods, "plots", "show", "--json")
    assert shown.returncode == 0 and "failed to load" not in shown.stderr, shown.stderr
    plots = json.loads(shown.stdout)
    assert "errors" not in plots
    assert sorted(plots["data"]) == ["metrics/plots/learning/ran/train_loss.json",
                                     "metrics/plots/learning/ran/val_accuracy.json",
                                     "metrics/plots/scores/ran/ap_by_class.json",
                                     "metrics/plots/scores/ran/err_by_lead_h.json"]
    learning = plots["data"]["metrics/plots/learning/ran/train_loss.json"][0]["content"]
    assert {point["field"] for point in learning["data"]["values"]} == set(rp.LEARNING_ROLES)  # a line each
    bars = plots["data"]["metrics/plots/scores/ran/err_by_lead_h.json"][0]["content"]
    assert bars["encoding"]["y"] == {"field": "bar", "type": "nominal", "title": "x · role"}
    assert len(bars["data"]["values"]) == 2 * 4  # two leads, four roles


def test_the_stage_that_ran_is_up_to_date_and_the_other_is_not(two_methods):
    status = dvc(two_methods, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert set(json.loads(status.stdout)) == {"train@not_run"}
