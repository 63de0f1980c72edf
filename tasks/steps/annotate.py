"""What a user reads of a method in the MLflow UI: run names, run and experiment descriptions, the
claim's verdict on every run of the flow, and a saved view of the runs table that compares the roles.

MLflow shows a run's name in every table and chart legend, often in a narrow column, so names are
short: `teacher s0`, `kd s1`, `labels s2`, a baseline by its role, and the parent run
`holds · hinton_kd` once the claim is checked. Descriptions are Markdown (the `mlflow.note.content`
tag); their links are relative to the UI's own address (`#/experiments/...`), so they work whichever
server shows them. The names and descriptions are only for reading: code finds runs by their
`distillery.*` tags, which keep their names.
"""
from __future__ import annotations

import os
from typing import Any

from mlflow.tracking import MlflowClient

from ..methods import MethodSpec, loss_terms
from ..platform import tracking
from ..platform.params import MethodParams
from .claims import summarize
from .plan import registered_names

SHORT_ROLE = {"student_kd": "kd", "student_labels": "labels"}
TRAINED_ROLES = ("teacher", "student_kd", "student_labels")  # the others: non-learned baselines, one run
SCORE = "score"          # every evaluated run's primary test metric, under one name for every method
VIEW_ID = "distillery-roles"
# a run's description once its flow's claim is checked: the result on top, what it trained below
RESULT, RESULT_END = "**Result**", "\n\n---\n\n"


def role_label(role: str) -> str:
    return SHORT_ROLE.get(role, role)


def run_name(role: str, seed: int, unit: str = "", composed: bool = False) -> str:
    """`kd s1`; `teacher 24h s0` for one unit of a composed model, `teacher s0 composed` for the whole."""
    return " ".join(filter(None, (role_label(role), unit, f"s{seed}", "composed" if composed else "")))


def parent_name(method: str, verdict: str | None = None) -> str:
    """The verdict first: the runs table cuts names at ~17 characters (`inconclusive · pangu_eda_upper`)."""
    return f"{verdict} · {method}" if verdict else method


def run_source(deployment: str | None = None) -> dict[str, str]:
    """How this flow run was started: `distillery.source` (dvc, prefect-deployment or cli) and
    `distillery.entry_point` (the DVC stage, the deployment, or the command)."""
    if deployment:
        return {"source": "prefect-deployment", "entry_point": deployment}
    if os.environ.get("DVC_STAGE"):  # DVC sets it for every stage command it runs
        exp = os.environ.get("DVC_EXP_NAME")
        how = f"dvc exp run ({exp})" if exp else "dvc repro"
        return {"source": "dvc", "entry_point": f"{how} {os.environ['DVC_STAGE']}"}
    return {"source": "cli", "entry_point": "python -m flows.method"}


def summary(spec: MethodSpec) -> str:
    """The method's one-line description: its declaration's `description`, else its file's docstring."""
    if spec.description:
        return spec.description
    import importlib
    try:
        doc = importlib.import_module(f"tasks.methods.{spec.name}").__doc__ or ""
    except ModuleNotFoundError:  # a method declared elsewhere (a test's)
        return ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _short(digest: str) -> str:
    return digest[:12] if digest and digest != "none" else digest


def data_line(lineage: dict[str, str]) -> str:
    short = {k: _short(lineage.get(k, "")) for k in ("data_sha256", "dvc_lock_md5", "git_commit")}
    return (f"data `{lineage.get('data_dir', '?')}` (sha256 `{short['data_sha256']}`, dvc.lock md5 "
            f"`{short['dvc_lock_md5']}`), code `{short['git_commit']}`"
            f"{' (uncommitted changes)' if lineage.get('git_dirty') == 'true' else ''}")


def loss_text(terms: dict[str, dict[str, Any]]) -> str:
    def term(name: str, cfg: dict[str, Any]) -> str:
        args = ", ".join(f"{k} {v}" for k, v in cfg.items())
        return f"{name} ({args})" if args else name
    return " + ".join(term(n, c) for n, c in terms.items())


def training_description(role: str, seed: int, unit: str, model_name: str, n_params: int, ctx: tracking.RunContext,
                         teacher_run_id: str | None = None, teacher_version: str | None = None,
                         terms: dict[str, dict[str, Any]] | None = None, composed: bool = False) -> str:
    """What a training (or composed) run is and what it learned from, written when it starts."""
    what = f"`{model_name}` ({n_params:,} parameters)" if n_params else f"`{model_name}`"
    head = f"**{run_name(role, seed, '' if composed else unit, composed)}** ({role}, seed {seed}): {what}"
    if composed:
        body = f"the trained units {unit} composed into the model this role is evaluated as (members in its tags)"
    elif teacher_run_id:
        version = ""
        if teacher_version:
            name, _, number = teacher_version.partition("/")
            version = f" ([{name} v{number}]({tracking.model_version_link(name, number)}))"
        body = f"distilled from {run_ref(teacher_run_id, ctx)}{version} with {loss_text(terms or {})}"
    elif role == "teacher":
        body = "trained on the targets (labels) alone"
    else:
        body = "the student trained on the targets (labels) alone, no teacher"
    return f"{head}, {body}{'; unit ' + unit if unit and not composed else ''}.\n\nOn {data_line(ctx.lineage)}."


def baseline_description(role: str, kind: str, ctx: tracking.RunContext) -> str:
    return f"**{role}**: a non-learned baseline of the {kind} kind, scored on the same test split.\n\n" \
           f"On {data_line(ctx.lineage)}."


def run_ref(run_id: str, ctx: tracking.RunContext) -> str:
    """A Markdown link to a run's page by its name, in whichever experiment it is (a training shared
    between methods lives in the experiment of the method that trained it first)."""
    info = MlflowClient(ctx.tracking_uri).get_run(run_id).info
    return f"[{info.run_name}]({tracking.run_link(info.experiment_id, run_id)})"


def versions_by_run(names: list[str], ctx: tracking.RunContext) -> dict[str, list[tuple[str, int]]]:
    """run id -> the (registered model, version) pairs logged from it."""
    client = MlflowClient(ctx.tracking_uri)
    out: dict[str, list[tuple[str, int]]] = {}
    for name in names:
        for mv in client.search_model_versions(f"name='{name}'"):
            out.setdefault(mv.run_id, []).append((name, int(mv.version)))
    return out


def _ci(part: dict[str, Any]) -> str:
    if part["ci95"] is None:
        return "no interval (one pair)"
    low, high = part["ci95"]
    return f"95% CI [{low:+.4g}, {high:+.4g}]"


def claim_markdown(verdict: dict[str, Any]) -> str:
    def part(p: dict[str, Any]) -> str:
        return (f"`{p['statement']}`: **{p['verdict']}**, mean difference {p['diff_mean']:+.4g}, {_ci(p)}, "
                f"seeds {', '.join(map(str, p['seeds']))}")
    if len(verdict["parts"]) == 1:
        return f"Claim {part(verdict['parts'][0])}."
    return f"Claim: **{verdict['verdict']}**\n\n" + "\n".join(f"- {part(p)}" for p in verdict["parts"])


def annotate_flow(spec: MethodSpec, trained: list[Any], evaluations: list[dict[str, Any]],
                  verdict: dict[str, Any], ctx: tracking.RunContext) -> list[str]:
    """Once the claim is checked and the models registered: every run of this experiment that the flow
    trained or scored gets the verdict and, at the top of its description, the result; the parent run
    its name and summary. Returns the ids of the runs annotated.

    A run reused from an earlier flow run (a cached training) is part of this verdict too, so it is
    annotated again; a training shared from another method's experiment is left to that method."""
    client = MlflowClient(ctx.tracking_uri)
    parent = ctx.parent_run_id
    flow = f"[{parent_name(spec.name, verdict['verdict'])}]({tracking.run_link(ctx.experiment_id, parent)})"
    registry = versions_by_run(list(registered_names(spec).values()), ctx)
    evaluated = {e["run_id"]: e for e in evaluations}
    runs = {run_id: client.get_run(run_id) for run_id in dict.fromkeys([*evaluated, *(t.run_id for t in trained)])}
    # the units a composed model joins point at the composed run, which is the one scored
    composed_of = {u.run_id: m for m in trained if m.run_id in evaluated
                   for u in trained if u.run_id != m.run_id and (u.role, u.seed) == (m.role, m.seed)}
    annotated = []
    for run_id, run in runs.items():
        if run.info.experiment_id != ctx.experiment_id:
            continue
        e = evaluated.get(run_id)
        if e is not None:
            result = (f"`{SCORE}` = test {spec.primary_metric} **{e['metrics'][spec.primary_metric]:.4g}** "
                      f"({'higher' if spec.higher_is_better else 'lower'} is better)")
        else:
            m = composed_of.get(run_id)
            result = ("scored as part of " + f"[{run_name(m.role, m.seed, composed=True)}]"
                      f"({tracking.run_link(ctx.experiment_id, m.run_id)})") if m else "not scored itself"
        lines = [f"{RESULT} in {flow}: {result}; claim **{verdict['verdict']}**."]
        lines += [f"Registered as [{name} v{version}]({tracking.model_version_link(name, version)}); the "
                  f"`{tracking.CHAMPION_TAG}` tag says whether it is the champion now."
                  for name, version in registry.get(run_id, [])]
        tracking.annotate_run(run_id, ctx, description=" ".join(lines) + RESULT_END + training_part(run),
                              tags={"claim_verdict": verdict["verdict"], "claim_run_id": parent})
        annotated.append(run_id)
    experiments = {run_id: run.info.experiment_id for run_id, run in runs.items()}
    tracking.annotate_run(parent, ctx, name=parent_name(spec.name, verdict["verdict"]),
                          description=parent_description(spec, evaluations, verdict, registry, experiments, ctx))
    return annotated


def training_part(run: Any) -> str:
    """A run's description without the result an earlier claim step put on top."""
    note = run.data.tags.get(tracking.NOTE, "")
    return note.split(RESULT_END, 1)[1] if note.startswith(RESULT) and RESULT_END in note else note


def parent_description(spec: MethodSpec, evaluations: list[dict[str, Any]], verdict: dict[str, Any],
                       registry: dict[str, list[tuple[str, int]]], experiments: dict[str, str],
                       ctx: tracking.RunContext) -> str:
    """The flow run's page: the verdict, each role's score over seeds with a link per run, the models."""
    rows = []
    for role in dict.fromkeys(e["role"] for e in sorted(evaluations, key=lambda e: role_rank(spec, e["role"]))):
        runs = sorted((e for e in evaluations if e["role"] == role), key=lambda e: e["seed"])
        s = summarize([e["metrics"][spec.primary_metric] for e in runs])
        links = " ".join(f"[s{e['seed']}]({tracking.run_link(experiments[e['run_id']], e['run_id'])})" for e in runs)
        spread = f" ± {s['std']:.3g}" if s["n"] > 1 else ""
        rows.append(f"| {role_label(role)} | {s['mean']:.4g}{spread} | {links} |")
    models = sorted({pair for e in evaluations for pair in registry.get(e["run_id"], [])})
    registered = ", ".join(f"[{n} v{v}]({tracking.model_version_link(n, v)})" for n, v in models) or "none"
    return "\n\n".join([
        claim_markdown(verdict),
        f"| role | test {spec.primary_metric} (`{SCORE}`), mean ± std over seeds | runs |\n|---|---|---|\n"
        + "\n".join(rows),
        f"Registered from this flow run: {registered}.",
        f"**{spec.name}**: {summary(spec)} On {data_line(ctx.lineage)}; started by "
        f"{ctx.lineage.get('entry_point', '?')}.",
    ])


def role_rank(spec: MethodSpec, role: str) -> int:
    """Teacher, the distilled student, then the baselines, in the method's order."""
    order = list(spec.roles)
    return order.index(role) if role in order else len(order)


def comparison_view(spec: MethodSpec) -> dict[str, Any]:
    """The saved view's state (MLflow's runs-table UI state and search facets): finished runs, best
    `score` first, with the role, seed, score, verdict, champion and source as columns."""
    def tag(name: str) -> str:
        return f"tags.`{tracking.TAG}{name}`"
    # column id -> width in pixels; the table shows them in this order after the run name
    columns = {tag("role"): 120, tag("seed"): 60, f"metrics.`{SCORE}`": 150, tag("claim_verdict"): 110,
               tag("champion"): 190, tag("source"): 90, "attributes.`Models`": 110}
    return {
        "searchFilter": "attributes.status = 'FINISHED'", "orderByKey": f"metrics.`{SCORE}`",
        "orderByAsc": not spec.higher_is_better, "startTime": "ALL", "lifecycleFilter": "Active",
        "datasetsFilter": [], "modelVersionFilter": "All Runs",
        "selectedColumns": list(columns), "columnOrder": ["attributes.`Run Name`", *columns],
        "columnWidths": {"attributes.`Run Name`": 190, **columns},
    }


def experiment_description(spec: MethodSpec, mp: MethodParams, ctx: tracking.RunContext,
                           verdict: dict[str, Any] | None = None) -> str:
    """What the method is and claims, the latest flow run's verdict and how the runs are named. The
    experiment page shows the first paragraph, so it holds the verdict and the comparison's link."""
    latest = ""
    if verdict is not None and ctx.parent_run_id:
        flow = tracking.run_link(ctx.experiment_id, ctx.parent_run_id)
        latest = f" Latest verdict: **{verdict['verdict']}** ([{parent_name(spec.name, verdict['verdict'])}]({flow}))."
    models = f"teacher `{spec.teacher}`" + (f" → student `{spec.student}`" if spec.student else "")
    loss = f"; loss {loss_text(loss_terms(spec, mp.loss))}" if spec.recipe == "distill" else ""
    registered = ", ".join(f"[{n}](#/models/{n}{tracking.UI_MODE}) ({role_label(r)})"
                           for r, n in registered_names(spec).items())
    return "\n".join([
        f"**{spec.name}**: {summary(spec)}{latest} "
        f"[Compare the roles]({tracking.experiment_link(ctx.experiment_id, VIEW_ID)}) (also under Views).",
        "",
        f"- {spec.kind}, recipe {spec.recipe}: {models}{loss}",
        f"- claim `{' and '.join(c.statement for c in spec.claims)}`, checked over seeds "
        f"{', '.join(map(str, mp.seeds))} with a paired 95% Student-t interval",
        f"- `{SCORE}` = test {spec.primary_metric} ({'higher' if spec.higher_is_better else 'lower'} is better) "
        f"on every scored run (`{tracking.TAG}score_metric` names it)",
        f"- registered: {registered}",
        f"- latest flow run on {data_line(ctx.lineage)}",
        f"- runs: one parent per flow run (`{parent_name(spec.name, 'verdict')}`), under it "
        + ", ".join(f"`{run_name(r, 0) if r in TRAINED_ROLES else r}`" for r in spec.roles) + " and so on per seed",
    ])


def annotate_experiment(spec: MethodSpec, mp: MethodParams, ctx: tracking.RunContext,
                        verdict: dict[str, Any] | None = None) -> None:
    """With a verdict, after the claim step; without one when a flow starts, and then only for an
    experiment without a description yet, so a failing flow leaves the link to the latest verdict."""
    if verdict is None:
        if tracking.NOTE in MlflowClient(ctx.tracking_uri).get_experiment(ctx.experiment_id).tags:
            return
    tracking.describe_experiment(ctx, experiment_description(spec, mp, ctx, verdict), primary_metric=SCORE)
    tracking.save_view(ctx, VIEW_ID, f"{spec.name}: roles, score, verdict", comparison_view(spec))
