"""MLflow: where runs go, what every run records (params, lineage), models and the `champion` alias.

Embedded default: SQLite (`sqlite:///mlflow.db`) plus a local artifact directory, from params.yaml ›
tracking; `MLFLOW_TRACKING_URI` (e.g. an `mlflow server` on PostgreSQL) overrides it. Nothing here
keeps an "active run" between calls: MLflow's run stack is thread-local, and Prefect may run tasks on
other threads, so every call names its run id explicitly.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import mlflow
import torch
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from .common import REPO_ROOT

CHAMPION = "champion"
TAG = "distillery."  # prefix of our own tags
# Tags the MLflow UI reads. A run's or experiment's description is the Markdown of its note tag; the
# experiment kind says it is a model-training experiment, not a GenAI one (MLflow 3.17's UI follows a
# per-browser switch instead: see UI_MODE); the primary metric is one the chart view always draws.
NOTE = "mlflow.note.content"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
PRIMARY_METRIC = "mlflow.experiment.primaryMetric.name"
SAVED_VIEW = "mlflow.sharedViewState."  # + view id: a saved view of the runs table (its Views menu)
# absolute tolerance on `test_*` metrics when a run is rerun from the same commit and data on CPU
# (`distillery reproduce` reads it from every trained or evaluated run)
REPRODUCE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class RunContext:
    """What a task needs to put its run in the right place with the right lineage (picklable)."""
    tracking_uri: str
    experiment_id: str
    store_id: str                 # changes when the tracking store is recreated: part of cache keys
    parent_run_id: str | None = None
    lineage: dict[str, str] = field(default_factory=dict)


def resolve_tracking_uri(params: dict[str, Any] | None = None) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (params or {}).get("tracking_uri") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())  # independent of the cwd later
    return uri


def prepare_store(tracking_uri: str) -> None:
    """Creates the schema once, before any fan-out (parallel first use races on migrations), and
    switches SQLite to WAL so concurrent writers wait instead of failing with 'database is locked'.

    Processes race on a new SQLite store too: MLflow migrates it table by table, so two flows started
    at once fail with 'table _alembic_tmp_… already exists' or 'duplicate column name'. They take
    turns on an flock beside the database; the kernel drops it when its holder exits, even killed."""
    mlflow.set_tracking_uri(tracking_uri)
    if not tracking_uri.startswith("sqlite:///"):
        MlflowClient(tracking_uri).search_experiments(max_results=1)
        return
    db = Path(tracking_uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
        MlflowClient(tracking_uri).search_experiments(max_results=1)


def experiment_context(name: str, params: dict[str, Any], lineage: dict[str, str]) -> RunContext:
    """Gets or creates the method's experiment; artifacts go under params' artifact_root."""
    uri = resolve_tracking_uri(params)
    prepare_store(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        client.create_experiment(name, artifact_location=artifact_location(uri, params.get("artifact_root"), name),
                                 tags=dict([EXPERIMENT_KIND]))
        exp = client.get_experiment_by_name(name)
    elif EXPERIMENT_KIND[0] not in exp.tags:  # an experiment created before the tag existed
        client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
    ended = end_orphaned_runs(client, exp.experiment_id)
    if ended:
        logging.getLogger(__name__).warning("%s: marked %d run(s) KILLED whose process had died: %s",
                                            name, len(ended), ", ".join(ended))
    # the store's identity: its URI and when its Default experiment (created with the store) was made
    default = client.get_experiment("0")
    return RunContext(tracking_uri=uri, experiment_id=exp.experiment_id,
                      store_id=f"{redact(uri)}@{default.creation_time}", lineage=dict(lineage))


def artifact_location(tracking_uri: str, root: str | None, name: str) -> str | None:
    """Where a new experiment keeps its artifacts. A tracking server decides itself (it proxies them
    to its own store, so a worker's temporary directory never holds them); a local store puts them
    under params' artifact_root."""
    if tracking_uri.startswith(("http://", "https://")) or not root:
        return None
    if "://" in root:
        return f"{root.rstrip('/')}/{name}"
    return Path(root).resolve().joinpath(name).as_uri()


def redact(uri: str) -> str:
    """`uri` without a password, for reports and logs (`http://user:secret@host` -> `http://user:***@host`)."""
    return re.sub(r"(//[^/:@]+):[^/@]*@", r"\1:***@", uri)


@contextlib.contextmanager
def parent_run(ctx: RunContext, name: str, tags: dict[str, Any] | None = None,
               description: str | None = None) -> Iterator[str]:
    """A run that spans several tasks (and maybe threads), so it is driven through the client and
    always ended: FINISHED, FAILED on error, KILLED on interrupt (never left RUNNING)."""
    from mlflow.tracking.context.registry import resolve_tags
    client = MlflowClient(ctx.tracking_uri)
    # the context tags `mlflow.start_run` adds by itself (user, source, git commit): without them the
    # parent's Source and User columns stay empty while its children's are filled
    r = client.create_run(ctx.experiment_id, run_name=name, tags=resolve_tags(_tags(ctx, tags, description)))
    status = RunStatus.FAILED
    try:
        yield r.info.run_id
        status = RunStatus.FINISHED
    except Exception:
        raise
    except BaseException:  # KeyboardInterrupt, or Prefect's TerminationSignal when a worker stops
        status = RunStatus.KILLED
        raise
    finally:
        client.set_terminated(r.info.run_id, RunStatus.to_string(status))


@contextlib.contextmanager
def run(ctx: RunContext, name: str, tags: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None, description: str | None = None) -> Iterator[str]:
    """A run inside one task: the fluent API is safe here (one task, one thread). Nested under
    ctx.parent_run_id; an exception marks it FAILED. `description`: Markdown, shown on the run page."""
    mlflow.set_tracking_uri(ctx.tracking_uri)
    with mlflow.start_run(experiment_id=ctx.experiment_id, run_name=name,
                          parent_run_id=ctx.parent_run_id, tags=_tags(ctx, tags, description)) as r:
        if params:
            mlflow.log_params({k: str(v)[:6000] for k, v in flatten(params).items()})
        yield r.info.run_id


class EpochLogger:
    """Per-epoch metrics for one run, written in batches at most every `interval` seconds (and on
    `close`). One commit per epoch cost ~8 ms on SQLite, 5 % of a default-profile task; MLflow's own
    async mode waits ~1 s for its worker thread when the run ends (benchmarks/orchestration.py)."""

    def __init__(self, run_id: str, ctx: RunContext, interval: float = 5.0) -> None:
        self.run_id, self.ctx, self.interval = run_id, ctx, interval
        self._pending: list = []
        self._last = time.monotonic()

    def __call__(self, row: dict[str, float]) -> None:
        from mlflow.entities import Metric
        now_ms, step = int(time.time() * 1000), int(row["epoch"])
        self._pending += [Metric(k, float(v), now_ms, step) for k, v in row.items() if k != "epoch"]
        if time.monotonic() - self._last >= self.interval:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            MlflowClient(self.ctx.tracking_uri).log_batch(self.run_id, metrics=self._pending)
            self._pending = []
        self._last = time.monotonic()

    close = flush


def _tags(ctx: RunContext, tags: dict[str, Any] | None, description: str | None = None) -> dict[str, str]:
    out = {f"{TAG}{k}": str(v) for k, v in ctx.lineage.items()}
    out.update({f"{TAG}{k}": str(v) for k, v in (tags or {}).items()})
    out[OWNER] = owner()
    if description:
        out[NOTE] = description
    return out


# ---------------------------------------------------------------------------------------------------
# runs whose process died (SIGKILL, OOM, power): RUNNING forever unless someone ends them

OWNER = f"{TAG}owner"  # host:pid:start time of the process that opened the run


def owner(pid: int | None = None) -> str:
    import psutil
    proc = psutil.Process(pid)
    return f"{socket.gethostname()}:{proc.pid}:{proc.create_time():.3f}"


def owner_alive(tag: str) -> bool | None:
    """Whether the process named by an owner tag still runs; None when it ran on another host (or the
    tag is not ours), where this process cannot tell."""
    import psutil
    host, _, rest = tag.partition(":")
    pid, _, started = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:  # the start time tells a reused pid from the owner
        return f"{psutil.Process(int(pid)).create_time():.3f}" == started
    except psutil.NoSuchProcess:
        return False


def end_orphaned_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Marks KILLED the experiment's RUNNING runs whose process on this host is gone; returns their ids.
    Runs from other hosts are left alone: only their own host can tell whether they still run."""
    ended = []
    for r in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=1000):
        if owner_alive(r.data.tags.get(OWNER, "")) is False:
            client.set_tag(r.info.run_id, f"{TAG}ended_by", f"{owner()} (its process was gone)")
            client.set_terminated(r.info.run_id, RunStatus.to_string(RunStatus.KILLED))
            ended.append(r.info.run_id)
    return ended


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def set_tags(run_id: str, tags: dict[str, Any], ctx: RunContext) -> None:
    client = MlflowClient(ctx.tracking_uri)
    for k, v in tags.items():
        client.set_tag(run_id, f"{TAG}{k}", str(v))


def annotate_run(run_id: str, ctx: RunContext, *, name: str | None = None, description: str | None = None,
                 tags: dict[str, Any] | None = None) -> None:
    """A finished run's name, description (Markdown) and `distillery.*` tags, in one write."""
    from mlflow.entities import RunTag
    out = [RunTag(f"{TAG}{k}", str(v)) for k, v in (tags or {}).items()]
    if name:
        out.append(RunTag("mlflow.runName", name))
    if description:
        out.append(RunTag(NOTE, description))
    MlflowClient(ctx.tracking_uri).log_batch(run_id, tags=out)


def describe_experiment(ctx: RunContext, description: str, primary_metric: str | None = None) -> None:
    client = MlflowClient(ctx.tracking_uri)
    client.set_experiment_tag(ctx.experiment_id, NOTE, description)
    if primary_metric:
        client.set_experiment_tag(ctx.experiment_id, PRIMARY_METRIC, primary_metric)


def save_view(ctx: RunContext, view_id: str, name: str, state: dict[str, Any]) -> None:
    """A saved view of the experiment's runs table (columns, sort, filter, grouping) as MLflow's UI
    stores one: it is listed under Views and opens at `#/experiments/<id>/runs?viewStateShareKey=<view_id>`.
    Rewritten in place, so the flow's view stays one entry however often it runs."""
    import json
    client = MlflowClient(ctx.tracking_uri)
    key = f"{SAVED_VIEW}{view_id}"
    now = int(time.time() * 1000)
    old = client.get_experiment(ctx.experiment_id).tags.get(key)
    created = json.loads(old).get("createdAt", now) if old else now
    client.set_experiment_tag(ctx.experiment_id, key, json.dumps(
        {"name": name, "createdAt": created, "updatedAt": now, "state": json.dumps(state)}))


# MLflow 3.17's UI shows every experiment in its GenAI layout until the browser is switched to "Model
# training" (a setting kept per browser, not per experiment), and files a run without a logged model
# (a flow's parent run) under "Evaluations" there; this parameter switches the page a link opens.
UI_MODE = "?workflowType=machine_learning"


def run_link(experiment_id: str, run_id: str) -> str:
    """A link to a run page, relative to the MLflow UI it is shown in (server-independent)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}{UI_MODE}"


def experiment_link(experiment_id: str, view: str | None = None) -> str:
    """The experiment's runs table, in a saved view when `view` names one (`save_view`)."""
    return f"#/experiments/{experiment_id}/runs{UI_MODE}" + (f"&viewStateShareKey={view}" if view else "")


def model_version_link(name: str, version: int | str) -> str:
    return f"#/models/{name}/versions/{version}{UI_MODE}"


def log_metrics(run_id: str, metrics: dict[str, float], ctx: RunContext, step: int | None = None) -> None:
    """Logs to any run by id (e.g. test metrics added to a finished training run)."""
    from mlflow.entities import Metric
    now = int(time.time() * 1000)
    MlflowClient(ctx.tracking_uri).log_batch(
        run_id, metrics=[Metric(k, float(v), now, step or 0) for k, v in metrics.items()])


def log_dict(run_id: str, obj: dict[str, Any], artifact_file: str, ctx: RunContext) -> None:
    MlflowClient(ctx.tracking_uri).log_dict(run_id, obj, artifact_file)


def log_figure(run_id: str, fig: Any, artifact_file: str, ctx: RunContext) -> None:
    MlflowClient(ctx.tracking_uri).log_figure(run_id, fig, artifact_file, save_kwargs={"dpi": 80})


def log_learning_curve(history: list[dict[str, float]], title: str) -> None:
    """Per-epoch losses and validation metrics as `learning_curve.png` on the active run. Drawn on a
    bare matplotlib Figure, not through pyplot's global state: ~25 ms less per run (of ~95)."""
    from matplotlib.figure import Figure

    final = history[-1]  # validated always; earlier epochs every `val_every`
    losses = [k for k in ("train_loss", "val_loss") if k in final]
    metrics = sorted(k for k in final if k.startswith("val_") and k != "val_loss")
    fig = Figure(figsize=(9 if metrics else 4.5, 3.2))
    axes = fig.subplots(1, 1 + bool(metrics), squeeze=False)[0]
    for ax, keys, log_scale in zip(axes, (losses, metrics), (True, False)):
        for key in keys:
            rows = [h for h in history if key in h]
            ax.plot([h["epoch"] for h in rows], [h[key] for h in rows], label=key)
        ax.set_xlabel("epoch")
        ax.legend()
        if log_scale:
            ax.set_yscale("log")
    fig.suptitle(title)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.15, top=0.86, wspace=0.25)  # tight_layout draws twice
    mlflow.log_figure(fig, "learning_curve.png", save_kwargs={"dpi": 80})


def log_model(model: torch.nn.Module, input_example: torch.Tensor | None) -> str:
    """Logs the model to the active run (eager pickle plus the `models/` source, so it loads without
    this checkout's install) and returns its `models:/<model_id>` URI."""
    # mlflow warns on every pickled model; we pickle on purpose (README, "Design notes": models are
    # pickled with code_paths)
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    info = mlflow.pytorch.log_model(
        model.cpu().eval(), name="model",
        input_example=None if input_example is None else input_example.cpu().numpy(),
        serialization_format="pickle", code_paths=[str(REPO_ROOT / "models")],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"])  # skips slow requirement inference
    return info.model_uri


def load_model(model_uri: str, ctx: RunContext) -> torch.nn.Module:
    """A model this project logged, back from the run's own store. The one place that unpickles:
    MLflow's eager PyTorch flavor is a whole pickled module whose logged `models/` source goes on
    sys.path, so it is code, trusted as much as the store it comes from (written by the flow itself:
    this checkout's SQLite and artifact directory, or the shared server behind its basic auth). So
    only `models:/` and `runs:/` URIs, which resolve in `ctx`'s store, never a path or a URL."""
    if not model_uri.startswith(("models:/", "runs:/")):
        raise ValueError(f"load_model: {model_uri!r} is not a models:/ or runs:/ URI of the tracking store")
    mlflow.set_tracking_uri(ctx.tracking_uri)
    return mlflow.pytorch.load_model(model_uri, map_location="cpu")


# ---------------------------------------------------------------------------------------------------
# registry

def register_version(name: str, model_uri: str, run_id: str, ctx: RunContext,
                     tags: dict[str, Any] | None = None) -> int:
    """Registers the model logged by `run_id` as a version of `name`; idempotent per run (a cached task
    that returns the same run does not add versions)."""
    client = MlflowClient(ctx.tracking_uri)
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name)
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    # a tracking server accepts a `models:/<model_id>` source only together with that model_id
    # (the SQLite store does not check)
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/") else None
    mv = existing[0] if existing else client.create_model_version(name, model_uri, run_id=run_id, model_id=model_id)
    for k, v in (tags or {}).items():
        client.set_model_version_tag(name, mv.version, f"{TAG}{k}", str(v))
    return int(mv.version)


def describe_model(name: str, version: int, ctx: RunContext, version_description: str,
                   model_description: str | None = None) -> None:
    """Markdown descriptions of a registered model version (and of the registered model)."""
    client = MlflowClient(ctx.tracking_uri)
    client.update_model_version(name, str(version), description=version_description)
    if model_description:
        client.update_registered_model(name, description=model_description)


def promote_if_better(name: str, version: int, score: float, higher_is_better: bool,
                      ctx: RunContext) -> dict[str, Any]:
    """Records `score` on the version and moves `champion` to it only if it beats the current
    champion's score; ties keep the old champion."""
    client = MlflowClient(ctx.tracking_uri)
    client.set_model_version_tag(name, str(version), f"{TAG}score", repr(float(score)))
    previous = champion_score(name, ctx)
    if previous is not None and previous[0] == version:
        better = True  # re-promoting the same version (a cached rerun) changes nothing
    else:
        better = previous is None or (score > previous[1] if higher_is_better else score < previous[1])
    if better:
        client.set_registered_model_alias(name, CHAMPION, str(version))
        _move_champion_tag(client, name, None if previous is None else previous[0], version)
    return {"name": name, "version": version, "score": score, "champion": better,
            "previous_champion": None if previous is None else {"version": previous[0], "score": previous[1]}}


# On the run of a champion version: `<name>@champion`, comma-separated when one run is the champion
# of several models (a teacher that methods share), so a run page says which champion it is.
CHAMPION_TAG = f"{TAG}champion"


def _move_champion_tag(client: MlflowClient, name: str, old_version: int | None, new_version: int) -> None:
    entry = f"{name}@{CHAMPION}"

    def update(version: int, add: bool) -> None:
        run_id = client.get_model_version(name, str(version)).run_id
        if not run_id:
            return
        try:
            current = client.get_run(run_id).data.tags.get(CHAMPION_TAG, "")
        except mlflow.exceptions.MlflowException:  # the run was deleted since
            return
        entries = {e for e in current.split(", ") if e} - {entry} | ({entry} if add else set())
        if entries:
            client.set_tag(run_id, CHAMPION_TAG, ", ".join(sorted(entries)))
        elif current:
            client.delete_tag(run_id, CHAMPION_TAG)

    if old_version is not None and old_version != new_version:
        update(old_version, add=False)
    update(new_version, add=True)


def champion_score(name: str, ctx: RunContext) -> tuple[int, float] | None:
    client = MlflowClient(ctx.tracking_uri)
    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None
    return int(mv.version), float(mv.tags[f"{TAG}score"])
