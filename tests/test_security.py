"""Security: nothing unpickles untrusted input, servers bind loopback unless told otherwise, and a
planted secret (CDS key, database password, MLflow and Prefect credentials) is written nowhere.

- a static check (ast) of models/, tasks/, flows/ and benchmarks/: `torch.load` always with a literal
  `weights_only=True`, no pickle-family loads, no `yaml.load` without a safe loader, no eval/exec, and
  MLflow's whole-module model loading only at the one place whose input is the project's own store;
- the command lines of every server the project starts (`make serve`, `make run`'s Prefect server)
  bind 127.0.0.1 by default and carry no secret (test_servers.py starts the real ones);
- the digits stage and a small method flow, run with secrets planted in their environment, leave
  none of them in their output, MLflow's runs, the store's files, artefacts, metrics/*.json or
  Prefect's home; the CDS download path scrubs its key from errors and from cdsapi's log lines.
"""
import ast
import base64
import dataclasses
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from tasks.platform import services as sv

SCANNED = ("models", "tasks", "flows", "benchmarks")

# The one sanctioned unpickling site, and why its input is trusted. Loading it as state dicts into
# rebuilt architectures would need every composed model's recipe carried through the flow; until
# then the boundary is the tracking store, which holds code (the logged models/ source) anyway.
# (file, function) -> (the one unpickling call allowed there, why it is safe)
TRUSTED_UNPICKLING = {
    ("tasks/platform/tracking.py", "load_model"): (
        "mlflow.", "models the flow itself logged, loaded by models:/ or runs:/ URI from the run's own store "
                   "(this checkout's SQLite + artifacts, or the shared server behind basic auth)"),
    ("tasks/kinds/detection3d/io.py", "read_nuscenes_info"): (
        "pickle.load", "mmdet3d's info pickle, only when the caller passes trusted=True (refused by "
                       "default: tests/test_detection3d_io.py)"),
}


# ---------------------------------------------------------------------------------------------------
# 1. no unsafe deserialisation

SAFE_YAML_LOADERS = {"yaml.SafeLoader", "yaml.CSafeLoader", "yaml.BaseLoader", "yaml.CBaseLoader"}
PICKLE_LOADS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads",
                "cloudpickle.load", "cloudpickle.loads", "joblib.load", "pandas.read_pickle", "shelve.open",
                "marshal.load", "marshal.loads", "yaml.unsafe_load", "yaml.unsafe_load_all", "yaml.full_load",
                "yaml.full_load_all"}


class _UnsafeLoads(ast.NodeVisitor):
    """Offences as (line, enclosing function, what), names resolved through the module's imports
    (`import numpy as np`, `from torch import load`)."""

    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}
        self.scope: list[str] = []
        self.found: list[tuple[int, str, str]] = []

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            if a.name.split(".")[0] == "dill":
                self.found.append((node.lineno, self._where(), "imports dill"))
            self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or not node.module:
            return
        if node.module.split(".")[0] == "dill":
            self.found.append((node.lineno, self._where(), "imports dill"))
        for a in node.names:
            self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def _where(self) -> str:
        return self.scope[0] if self.scope else "<module>"

    def _qualified(self, node: ast.AST) -> str | None:
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if not isinstance(node, ast.Name):
            return None
        return ".".join([self.aliases.get(node.id, node.id), *reversed(parts)])

    def visit_Call(self, node: ast.Call) -> None:
        name = self._qualified(node.func)
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        literal = lambda key, value: isinstance(kw.get(key), ast.Constant) and kw[key].value is value
        problem = None
        if name in ("torch.load", "torch.serialization.load") and not literal("weights_only", True):
            problem = f"{name} without weights_only=True"
        elif name in PICKLE_LOADS or (name or "").startswith("dill."):
            problem = f"{name} unpickles"
        elif name == "numpy.load" and "allow_pickle" in kw and not literal("allow_pickle", False):
            problem = "numpy.load with allow_pickle"
        elif name in ("yaml.load", "yaml.load_all"):
            loader = kw.get("Loader", node.args[1] if len(node.args) > 1 else None)
            if loader is None or self._qualified(loader) not in SAFE_YAML_LOADERS:
                problem = f"{name} without a safe Loader (use yaml.safe_load)"
        elif name in ("eval", "exec") and name not in self.aliases:
            problem = f"{name}()"
        elif name and name.startswith("mlflow.") and name.endswith(".load_model"):
            problem = f"{name} unpickles a whole module"
        if problem:
            self.found.append((node.lineno, self._where(), problem))
        self.generic_visit(node)


def unsafe_loads(source: str, path: str) -> list[tuple[int, str, str]]:
    visitor = _UnsafeLoads()
    visitor.visit(ast.parse(source, path))
    return visitor.found


def test_the_unsafe_load_check_finds_each_offence_with_its_line():
    # the check must be able to fail: each line below is an offence, and the safe forms are not
    source = """\
import pickle, torch, yaml
import numpy as np
import mlflow.pytorch
from torch import load as tload
from pickle import loads
import dill
torch.LOAD("a")
torch.LOAD("a", weights_only=False)
tload("a")
pickle.load(open("a", "rb"))
loads(b"")
np.load("a", allow_pickle=True)
yaml.load("a")
yaml.load("a", Loader=yaml.FullLoader)
eval("1")
def f(model_uri):
    return mlflow.pytorch.load_model(model_uri)
torch.load("a", weights_only=True)
np.load("a")
yaml.load("a", Loader=yaml.SafeLoader)
yaml.safe_load("a")
model.eval()
""".replace("LOAD", "load")  # spelt so that a text search for unsafe loads finds no offence here
    found = unsafe_loads(source, "snippet.py")
    assert [line for line, _, _ in found] == [6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 17]
    assert found[-1][1] == "f"


def test_no_unsafe_deserialisation_in_the_projects_code():
    files = sorted(p for d in SCANNED for p in (REPO / d).rglob("*.py"))
    assert len(files) > 20, "the check found no code to read"
    offences, sanctioned = [], set()
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        for line, where, problem in unsafe_loads(path.read_text(), rel):
            if (rel, where) in TRUSTED_UNPICKLING and problem.startswith(TRUSTED_UNPICKLING[rel, where][0]):
                sanctioned.add((rel, where))
                continue
            offences.append(f"{rel}:{line}: {problem} (in {where})")
    assert not offences, "unsafe deserialisation:\n" + "\n".join(offences)
    # the allow-list must not outlive its use
    assert sanctioned == set(TRUSTED_UNPICKLING)


def test_model_loading_accepts_only_uris_of_the_tracking_store(tracking_ctx, tmp_path):
    import torch
    from tasks.platform import tracking
    with tracking.run(tracking_ctx, "r"):
        uri = tracking.log_model(torch.nn.Linear(2, 2), torch.zeros(1, 2))
    assert isinstance(tracking.load_model(uri, tracking_ctx), torch.nn.Linear)
    # a loadable MLflow model from anywhere but the store, and a URL
    import mlflow.pytorch
    mlflow.pytorch.save_model(torch.nn.Linear(2, 2), tmp_path / "elsewhere", serialization_format="pickle")
    for other in (str(tmp_path / "elsewhere"), (tmp_path / "elsewhere").as_uri(), "http://127.0.0.1:9/m"):
        with pytest.raises(ValueError, match="not a models:/ or runs:/ URI"):
            tracking.load_model(other, tracking_ctx)


@pytest.mark.parametrize("cfg", [dict(optimizer="adamw", warmup_steps=3),
                                 dict(optimizer="sgd", scheduler="constant"),
                                 dict(optimizer="adam", grad_clip=1.0)])
def test_training_checkpoints_load_as_weights_only(tmp_path, cfg):
    # the loop's checkpoint (optimizer and scheduler state, RNG, history) must stay within what
    # torch's weights-only unpickler accepts, or resuming would fail where it matters
    import models
    from tasks.platform.params import TrainParams
    from tasks.train.checkpoint import Checkpointer
    from test_train_loop import run
    ckpt = Checkpointer(tmp_path / "job.pt", every=1)
    cfg = TrainParams(epochs=2, batch_size=32, lr=0.01, **cfg)
    run(models.create_model("digits_mlp_tiny", hidden=8), cfg, n=64, checkpoint=ckpt)
    state = ckpt.load()
    assert state["step"] == 4 and set(state) >= {"model", "optimizer", "scheduler", "rng", "history"}


# ---------------------------------------------------------------------------------------------------
# 2. servers bind loopback by default

@pytest.fixture
def spawned(monkeypatch):
    """Every server command the project would start, recorded instead of run: (name, argv, env)."""
    calls = []

    class Exited:  # a process that has already ended, so stopping it signals nothing
        pid, returncode = -1, 0

        def poll(self):
            return 0

        def wait(self, timeout=None):
            return 0

    def spawn(name, cmd, log, env, cwd=None, user=None):
        calls.append((name, list(cmd), dict(env)))
        return Exited()
    monkeypatch.setattr(sv, "spawn", spawn)
    monkeypatch.setattr(sv, "wait_until", lambda check, service, timeout: 0.0)
    monkeypatch.setattr(sv, "_tree", lambda pid: [pid])
    monkeypatch.setattr(sv, "_signal_group", lambda pid, sig: None)
    monkeypatch.setattr(sv, "_initdb", lambda data_dir, password, user: None)
    monkeypatch.setattr(sv, "ensure_database", lambda *a, **k: None)
    monkeypatch.setattr(sv, "postgres_bin", lambda name: name)
    return calls


def bound_host(name, argv):
    """The address a recorded server command binds."""
    if name == "postgres":
        (setting,) = [a for a in argv if a.startswith("listen_addresses=")]
        return setting.partition("=")[2]
    return argv[argv.index("--host") + 1]


def planted_credentials(monkeypatch):
    """Distinctive values for every credential the stack reads from the environment."""
    for f in dataclasses.fields(sv.Credentials):
        value = f"planted-{f.name.lower()}-{secrets.token_hex(8)}"
        monkeypatch.setenv(f.name, f"admin:{value}" if f.name == "PREFECT_API_AUTH_STRING" else value)
    return sv.Credentials.load(None)


def test_make_serve_binds_every_server_to_loopback_and_keeps_secrets_off_command_lines(tmp_path, spawned,
                                                                                       monkeypatch):
    from flows import serve
    monkeypatch.delenv("DISTILLERY_SERVE_HOST", raising=False)
    creds = planted_credentials(monkeypatch)
    parsed = []
    monkeypatch.setattr(serve, "serve", parsed.append)
    serve.main(["--state-dir", str(tmp_path / "state")])  # `make serve`, stopped after parsing
    (args,) = parsed
    assert args.host == sv.LOOPBACK

    # the stack it starts with those arguments (no worker repository or DVC remote set-up)
    monkeypatch.setattr(serve, "ensure_work_pool", lambda name, env: None)
    monkeypatch.setattr(serve, "worker_settings", lambda state, push_data: {})
    services = serve.start_stack(Path(args.state_dir), args.host, args.pg_port, args.mlflow_port,
                                 args.prefect_port, deploy=False, push_data=False)
    assert [s.name for s in services] == ["postgres", "mlflow", "prefect", "worker"]
    for name, argv, env in spawned:
        if name != "worker":
            assert bound_host(name, argv) == "127.0.0.1", (name, argv)
        # argv is world-readable (ps); the secrets travel in the environment
        assert not any(s in " ".join(argv) for s in creds.secrets()), (name, argv)
    assert all(s.url.split("//")[1].startswith("127.0.0.1:") for s in services[:3])
    ini = (Path(args.state_dir) / "mlflow-auth.ini").read_text()
    assert not any(s in ini for s in creds.secrets())

    # serving beyond loopback is an explicit choice
    monkeypatch.setenv("DISTILLERY_SERVE_HOST", "0.0.0.0")
    serve.main(["--state-dir", str(tmp_path / "state")])
    assert parsed[-1].host == "0.0.0.0"


def test_each_server_start_function_defaults_to_loopback(tmp_path, spawned):
    creds = sv.Credentials.load(None, env={})
    sv.start_postgres(tmp_path / "pg" / "data", 5433, creds.DISTILLERY_PG_PASSWORD)
    sv.start_mlflow(tmp_path, 5000, "sqlite:///" + str(tmp_path / "m.db"), creds)
    sv.start_prefect(tmp_path, 4200, creds)
    sv.start_prefect(tmp_path, 4201, None, services=False)  # `make run`'s server (flows/repro.py)
    assert [(name, bound_host(name, argv)) for name, argv, _ in spawned] == [
        ("postgres", "127.0.0.1"), ("mlflow", "127.0.0.1"), ("prefect", "127.0.0.1"),
        ("prefect", "127.0.0.1")]


def test_make_run_starts_its_prefect_server_on_loopback(spawned, monkeypatch):
    from flows import repro
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    ran = []
    # `dvc repro` itself is not run: only the server it would run against matters here
    monkeypatch.setattr(repro.subprocess, "run", lambda cmd, **kw: ran.append((cmd, kw)) or
                        subprocess.CompletedProcess(cmd, 0))
    assert repro.repro(["--dry"]) == 0
    (name, argv, _), = spawned
    assert name == "prefect" and bound_host(name, argv) == "127.0.0.1"
    assert ran[0][1]["env"]["PREFECT_API_URL"].startswith("http://127.0.0.1:")


# ---------------------------------------------------------------------------------------------------
# 3. planted secrets are written nowhere

def plant_secrets() -> dict[str, str]:
    """A distinctive random value for each secret a run's environment may hold."""
    tag = secrets.token_hex(10)
    values = {f.name: f"planted-{f.name.lower().replace('_', '-')}-{tag}"
              for f in dataclasses.fields(sv.Credentials) if f.name != "MLFLOW_TRACKING_USERNAME"}
    values.update(CDSAPI_KEY=f"{secrets.randbelow(900000) + 100000}:planted-cds-{tag}",
                  PREFECT_API_AUTH_STRING=f"admin:planted-prefect-auth-{tag}",
                  MLFLOW_TRACKING_TOKEN=f"planted-mlflow-token-{tag}",
                  PREFECT_API_KEY=f"planted-prefect-key-{tag}",
                  AWS_SECRET_ACCESS_KEY=f"planted-aws-secret-{tag}")  # a DVC remote's credentials
    return values


def secret_forms(planted: dict[str, str]) -> dict[str, bytes]:
    """What counts as a leak: each value, its secret part after `user:`, and the basic-auth header
    forms (base64 of user:password) an HTTP log line would carry."""
    forms = {}
    for name, value in planted.items():
        forms[name] = value.encode()
        if ":" in value:
            forms[f"{name} (secret part)"] = value.partition(":")[2].encode()
            forms[f"{name} (base64)"] = base64.b64encode(value.encode())
    forms["MLFLOW_TRACKING_PASSWORD (base64)"] = base64.b64encode(
        f"admin:{planted['MLFLOW_TRACKING_PASSWORD']}".encode())
    return forms


def leaks(blob: bytes | str, forms: dict[str, bytes]) -> list[str]:
    blob = blob.encode(errors="replace") if isinstance(blob, str) else blob
    return [name for name, form in forms.items() if form in blob]


def test_planted_secrets_appear_in_no_output_run_store_artefact_or_metrics_file(tmp_path, monkeypatch, capfd):
    from mlflow.tracking import MlflowClient
    from tasks.stages import digits
    planted = plant_secrets()
    forms = secret_forms(planted)
    # hinton_kd on one seed and one epoch, in a directory of its own: the stores are the embedded
    # defaults (params.yaml › tracking, prefect.toml's home), relative to it
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    method = params["methods"]["hinton_kd"]
    method.update(seeds=[0])
    method["teacher"]["epochs"] = method["student"]["epochs"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(REPO / "prefect.toml", tmp_path / "prefect.toml")
    for k in [k for k in os.environ if k.startswith(("MLFLOW_", "PREFECT_", "CDSAPI_"))]:
        monkeypatch.delenv(k)
    for k, v in dict(planted, MLFLOW_TRACKING_USERNAME="admin", PREFECT_SERVER_ANALYTICS_ENABLED="false",
                     DISTILLERY_CHECKPOINTS=str(tmp_path / ".checkpoints")).items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)

    t0 = time.monotonic()
    digits.main(["data/digits"])  # the stage, in this process (dvc.yaml runs the same main)
    output = [capfd.readouterr()]
    # the flow as `dvc repro` runs it, a process of its own, its Prefect API the ephemeral one
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run([sys.executable, "-m", "flows.method", "hinton_kd"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    print(f"stage and flow: {time.monotonic() - t0:.1f} s")
    assert "digits: wrote" in output[0].out and "claim" in proc.stdout + proc.stderr
    found = leaks("\n".join([output[0].out, output[0].err, proc.stdout, proc.stderr]), forms)
    assert not found, f"a planted secret in the output: {found}"

    # what MLflow keeps, through its API: every experiment, run, model version and their fields
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    found, n_runs = [], 0
    for exp in client.search_experiments():
        found += [f"experiment {exp.name}: {n}" for n in leaks(json.dumps(exp.tags), forms)]
        for r in client.search_runs([exp.experiment_id]):
            n_runs += 1
            fields = {"params": r.data.params, "tags": r.data.tags, "metrics": list(r.data.metrics),
                      "run name": r.info.run_name}
            found += [f"run {r.info.run_id} {what}: {n}" for what, v in fields.items()
                      for n in leaks(json.dumps(v), forms)]
    for rm in client.search_registered_models():
        for mv in client.search_model_versions(f"name='{rm.name}'"):
            found += [f"model {rm.name}/{mv.version}: {n}"
                      for n in leaks(json.dumps([mv.tags, mv.source]), forms)]
    assert n_runs >= 4, "the flow left no runs to read"
    assert not found, "a planted secret in MLflow:\n" + "\n".join(found)

    # and every byte written: the SQLite store (and its WAL), the artefacts, metrics/*.json, the
    # data, Prefect's home (its database, result cache and logs)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    for expected in ("mlflow.db", "metrics/hinton_kd.json", ".prefect"):
        assert any(p.relative_to(tmp_path).as_posix().startswith(expected) for p in written), expected
    assert any("mlartifacts" in p.parts for p in written)
    found = [f"{p.relative_to(tmp_path)}: {n}" for p in written for n in leaks(p.read_bytes(), forms)]
    assert not found, "a planted secret in a written file:\n" + "\n".join(found)


@pytest.mark.parametrize("source", ["CDSAPI_KEY", "cdsapirc"])
def test_a_cds_key_is_scrubbed_from_errors_and_cdsapi_log_lines(source, tmp_path, monkeypatch, caplog,
                                                                 capsys):
    from tasks.platform.common import cli_main
    from tasks.stages import era5_download as era5
    from test_era5 import cds_cfg, no_leftovers
    uid, token = str(secrets.randbelow(900000) + 100000), f"planted-cds-{secrets.token_hex(10)}"
    key = f"{uid}:{token}"  # not shaped like a UUID, so only the configured key itself can scrub it
    monkeypatch.setenv("CDSAPI_URL", "http://127.0.0.1:9/api")  # never contacted
    monkeypatch.setenv("CDSAPI_RC", str(tmp_path / "cdsapirc"))
    if source == "CDSAPI_KEY":
        monkeypatch.setenv("CDSAPI_KEY", key)
    else:
        monkeypatch.delenv("CDSAPI_KEY", raising=False)
        (tmp_path / "cdsapirc").write_text(f"url: http://127.0.0.1:9/api\nkey: {key}\n")
    caplog.set_level(logging.DEBUG)  # the worst case: cdsapi logs its key at DEBUG

    def rejecting_client():
        # the real client, configured as cdsapi configures it, answered by a server that echoes
        # the key in its error (both parts, and each alone)
        client = era5._default_client_factory()

        def retrieve(name, request, target):
            raise RuntimeError(f"401 Client Error: Unauthorized for uid {uid}, key {token} ({key})")
        client.retrieve = retrieve
        return client

    out = tmp_path / "raw.zarr"
    with pytest.raises(SystemExit) as e:
        cli_main(lambda argv: era5.download(cds_cfg(), out, client_factory=rejecting_client))
    assert e.value.code == 1
    printed = capsys.readouterr()
    text = caplog.text + printed.out + printed.err
    assert token not in text and key not in text
    assert "CDS request failed" in printed.err and "cdsapi: CDSAPI" in caplog.text  # both paths ran
    assert no_leftovers(out)
