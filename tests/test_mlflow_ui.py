"""The MLflow UI as a user sees a method: `mlflow server` on loopback over the store the real pipeline
wrote, opened in headless Chromium (Selenium) at 1600x1200.

What it checks is what issue 16's user had to dig for by hand: on the experiment page the parent run
named by its verdict, and the saved comparison view with a role, seed, `score` and verdict cell for
the teacher, the KD student and the label-only student; on the compare page of those three runs their
short names, a chart, the `score` row and the role and verdict tags; on the run pages the links from a
KD run to its teacher run and the teacher's registered version, and from the parent to its runs.

Screenshots of every page go to mlflow_ui/ under $DISTILLERY_TEST_ARTIFACTS (default tests/artifacts). A
check of another store: `python tests/test_mlflow_ui.py sqlite:////path/mlflow.db hinton_kd [DIR]`.
Chromium and chromedriver come from `make system-deps`; without them the test is skipped, and under
CI=true it fails.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO))

from tasks.platform import services as sv  # noqa: E402
from tasks.platform import tracking  # noqa: E402
from tasks.steps import annotate  # noqa: E402

pytestmark = pytest.mark.e2e

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
WINDOW = (1600, 1200)          # the screen
WAIT = 90                      # seconds for a page's React app to fetch and draw (2 loaded cores)
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The MLflow Assistant panel opens by itself on a browser's first visit to a loopback server and covers
# a third of the page; a user closes it once, and this says it was.
SEEN_ASSISTANT = "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
# The runs table (AG Grid, its pinned and scrolled parts rendered apart): {run id: {column id: text}}.
GRID_ROWS = """
const rows = {};
document.querySelectorAll('.ag-row[row-id]').forEach(r => {
  const id = r.getAttribute('row-id');
  rows[id] = rows[id] || {};
  r.querySelectorAll('[role=gridcell]').forEach(c => { rows[id][c.getAttribute('col-id')] = c.innerText.trim(); });
});
return rows;
"""
RUN_NAME = "attributes.`Run Name`"
# The compare page's metrics table is a virtualized grid: a metric's values share its name's row offset.
METRIC_ROW = """
const name = [...document.querySelectorAll('a[title="Plot chart"]')].find(a => a.innerText.trim() === arguments[0]);
if (!name) return null;
const top = name.parentElement.style.top;
let names = name.closest('.ReactVirtualized__Grid');
while (names && !(names.nextElementSibling && names.nextElementSibling.querySelector('.ReactVirtualized__Grid'))) {
  names = names.parentElement;
}
if (!names) return null;
return [...names.nextElementSibling.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > div')]
  .filter(d => d.style.top === top).sort((a, b) => parseFloat(a.style.left) - parseFloat(b.style.left))
  .map(d => d.innerText.trim());
"""


def artifacts_dir(name: str) -> Path:
    path = Path(os.environ.get("DISTILLERY_TEST_ARTIFACTS") or REPO / "tests" / "artifacts") / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def require_chromium() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (the dev extra)")
    if missing:
        message = f"the MLflow UI test needs {', '.join(missing)}: `make system-deps install`"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@contextlib.contextmanager
def mlflow_ui(tracking_uri: str, workdir: Path) -> Iterator[str]:
    """`mlflow server` (the UI and its REST API) on a free loopback port over `tracking_uri`; its URL."""
    port = sv.free_port()
    log = workdir / "mlflow-ui.log"
    cmd = [sv.bin_path("mlflow"), "server", "--backend-store-uri", tracking_uri, "--host", sv.LOOPBACK,
           "--port", str(port), "--workers", "1", "--default-artifact-root", (workdir / "artifacts").as_uri()]
    env = sv.base_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    svc = sv.Service("mlflow-ui", sv.spawn("mlflow-ui", cmd, log, env, cwd=workdir),
                     url=f"http://{sv.LOOPBACK}:{port}", log=log)
    try:
        sv.wait_until(lambda: sv.http_status(f"{svc.url}/api/2.0/mlflow/experiments/search?max_results=1") == 200,
                      svc, 180)
        yield svc.url
    finally:
        svc.stop()


@contextlib.contextmanager
def chromium(workdir: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-', dir=workdir)}")
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        driver.set_page_load_timeout(WAIT)
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": SEEN_ASSISTANT})
        yield driver
    finally:
        driver.quit()


def wait_for(driver: Any, what: str, check: Any) -> Any:
    """`check(driver)` once it is truthy (the React app draws after its API calls return)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait
    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.5).until(lambda d: check(d))
    except TimeoutException:
        raise AssertionError(f"{what}: not on {driver.current_url} after {WAIT} s; the page shows:\n"
                             f"{driver.find_element('tag name', 'body').text[:3000]}") from None


def row_cells(driver: Any, key: str) -> list[str]:
    """The cells of a compare-page table row (parameters, tags, run details) by its heading."""
    from selenium.webdriver.common.by import By
    return [td.text.strip() for td in driver.find_elements(By.XPATH, f"//tr[th[normalize-space()='{key}']]/td")]


def show_whole_description(driver: Any) -> None:
    """A run page folds a long description under "Show more"; a user reading it unfolds it."""
    from selenium.webdriver.common.by import By
    for button in driver.find_elements(By.XPATH, "//button[normalize-space()='Show more']"):
        button.click()


def shoot(driver: Any, shots: Path, name: str, element: Any = None) -> None:
    if element is not None:
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    driver.save_screenshot(str(shots / f"{name}.png"))


def comparison_runs(client: Any, experiment: str) -> dict[str, Any]:
    """From the store: the experiment, its latest finished flow run and, among the runs that flow's
    verdict was put on, the teacher, the KD student and the label-only student of the lowest seed."""
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r}"
    parents = client.search_runs([exp.experiment_id],
                                 "tags.`distillery.role` = 'flow' and attributes.status = 'FINISHED'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    assert parents, f"{experiment}: no finished flow run"
    parent = parents[0]
    runs = client.search_runs([exp.experiment_id], f"tags.`distillery.claim_run_id` = '{parent.info.run_id}'")
    by_role: dict[str, list[Any]] = {}
    for r in sorted(runs, key=lambda r: int(r.data.tags["distillery.seed"])):
        by_role.setdefault(r.data.tags["distillery.role"], []).append(r)
    picked = {role: by_role[role][0] for role in ("teacher", "student_kd", "student_labels")}
    return {"experiment": exp, "parent": parent, "verdict": parent.data.tags["distillery.claim_verdict"], **picked}


def check_mlflow_view(tracking_uri: str, experiment: str, shots: Path, workdir: Path) -> None:
    """The whole check against a store a method flow wrote (see the module's docstring)."""
    from mlflow.tracking import MlflowClient
    from selenium.webdriver.common.by import By
    found = comparison_runs(MlflowClient(tracking_uri), experiment)
    exp_id, parent, verdict = found["experiment"].experiment_id, found["parent"], found["verdict"]
    roles = {role: found[role] for role in ("teacher", "student_kd", "student_labels")}
    names = {role: r.info.run_name for role, r in roles.items()}
    seed = roles["student_kd"].data.tags["distillery.seed"]
    teacher_seed = int(roles["teacher"].data.tags["distillery.seed"])
    assert names == {"teacher": f"teacher s{teacher_seed}", "student_kd": f"kd s{seed}", "student_labels": f"labels s{seed}"}
    assert parent.info.run_name == annotate.parent_name(experiment, verdict)

    with mlflow_ui(tracking_uri, workdir) as url, chromium(workdir) as driver:
        # the experiment page as it opens: the parent run named by its verdict, the description on top
        driver.get(f"{url}/{tracking.experiment_link(exp_id)}")
        wait_for(driver, "the flow run named by its verdict", lambda d: parent.info.run_name in
                 d.execute_script(GRID_ROWS).get(parent.info.run_id, {}).get(RUN_NAME, ""))
        assert "Latest verdict" in driver.find_element(By.TAG_NAME, "body").text
        shoot(driver, shots, "experiment_runs")

        # the saved comparison view the description links to: a row per run with its cells
        driver.get(f"{url}/{tracking.experiment_link(exp_id, annotate.VIEW_ID)}")

        def table(d: Any) -> dict[str, dict[str, str]] | None:
            rows = d.execute_script(GRID_ROWS)
            return rows if all(rows.get(r.info.run_id, {}).get("metrics.`score`") for r in roles.values()) else None
        rows = wait_for(driver, "the comparison view's score cells", table)
        for role, run in roles.items():
            cells = rows[run.info.run_id]
            assert cells[RUN_NAME].endswith(names[role])  # after the run's colour label
            assert cells["tags.`distillery.role`"] == role
            assert cells["tags.`distillery.seed`"] == run.data.tags["distillery.seed"]
            assert cells["tags.`distillery.claim_verdict`"] == verdict
            assert float(cells["metrics.`score`"]) == pytest.approx(run.data.metrics["score"], rel=1e-9)
            assert cells["tags.`distillery.champion`"] == run.data.tags.get("distillery.champion", "-")
        assert rows[parent.info.run_id]["tags.`distillery.claim_verdict`"] == verdict
        shoot(driver, shots, "experiment_view")

        # the compare page of the three runs: names up top, a chart, the score row, role and verdict tags
        order = ("teacher", "student_kd", "student_labels")
        ids = [roles[r].info.run_id for r in order]
        query = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([exp_id])})
        driver.get(f"{url}/#/compare-runs?{query}&{tracking.UI_MODE[1:]}")
        wait_for(driver, "the compare page's run names",
                 lambda d: row_cells(d, "Run Name:") == [names[r] for r in order])
        wait_for(driver, "the compare page's chart",
                 lambda d: d.find_elements(By.CSS_SELECTOR, ".pcp-plot svg.main-svg"))
        shoot(driver, shots, "compare")
        scores = wait_for(driver, "the compare page's score row",
                          lambda d: d.execute_script(METRIC_ROW, annotate.SCORE))
        # the compare page rounds to three decimals
        assert [float(s) for s in scores] == pytest.approx([roles[r].data.metrics["score"] for r in order], abs=5e-4)
        shoot(driver, shots, "compare_metrics",
              driver.find_element(By.XPATH, f"//a[@title='Plot chart'][normalize-space()='{annotate.SCORE}']"))
        assert row_cells(driver, "distillery.role") == ["teacher", "student_kd", "student_labels"]
        assert row_cells(driver, "distillery.claim_verdict") == [verdict] * 3
        shoot(driver, shots, "compare_tags",
              driver.find_element(By.XPATH, "//tr[th[normalize-space()='distillery.claim_verdict']]"))

        # a KD run's page links to its teacher's run and registered version; the parent's to its runs
        # (links of the descriptions: with the UI mode, which MLflow's own links on these pages lack)
        def link(run_id: str) -> str:
            return f"a[href*='/runs/{run_id}{tracking.UI_MODE}']"
        kd = roles["student_kd"]
        driver.get(f"{url}/{tracking.run_link(exp_id, kd.info.run_id)}")
        teacher_link = wait_for(driver, "the KD run's link to its teacher run", lambda d: d.find_elements(
            By.CSS_SELECTOR, link(kd.data.tags["distillery.teacher_run_id"])))
        name, version = kd.data.tags["distillery.teacher_model_version"].split("/")
        assert driver.find_elements(By.CSS_SELECTOR, f"a[href='{tracking.model_version_link(name, version)}']")
        show_whole_description(driver)
        shoot(driver, shots, "kd_run", teacher_link[0])
        driver.get(f"{url}/{tracking.run_link(exp_id, parent.info.run_id)}")
        wait_for(driver, "the flow run's links to its runs", lambda d: all(d.find_elements(By.CSS_SELECTOR, link(i))
                                                                           for i in ids))
        assert verdict in driver.find_element(By.TAG_NAME, "body").text
        show_whole_description(driver)
        shoot(driver, shots, "parent_run")


@pytest.fixture(scope="session")
def browser_installed() -> None:
    """Session-scoped and requested before `pipeline`, so a missing browser skips (or fails) at once,
    not after the pipeline's quarter of an hour."""
    require_chromium()


def test_pipeline_method_compares_in_the_mlflow_ui(browser_installed, pipeline, tmp_path):
    """hinton_kd as the whole pipeline recorded it (the `pipeline` fixture: `dvc repro` of a copy)."""
    root, _, _ = pipeline
    check_mlflow_view(f"sqlite:///{root}/mlflow.db", "hinton_kd", artifacts_dir("mlflow_ui"), tmp_path)


if __name__ == "__main__":
    uri, name, *out = sys.argv[1:]
    shots_dir = Path(out[0]) if out else artifacts_dir("mlflow_ui")
    shots_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mlflow-ui-") as tmp:
        check_mlflow_view(uri, name, shots_dir, Path(tmp))
    print(f"ok: screenshots in {shots_dir}")
