"""The shared setup's servers as child processes: PostgreSQL, an MLflow server, a Prefect server, a worker.

Each server starts in a session of its own, so stopping it by PID stops its whole process tree (the
MLflow server forks uvicorn workers, PostgreSQL its backends). It binds 127.0.0.1 unless told
otherwise, and counts as started only when its health check answers. Access control is on:

- PostgreSQL: password (SCRAM-SHA-256) authentication for every connection, socket or TCP;
- MLflow: its basic-auth app; clients send MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD;
- Prefect: the API auth string (`user:password`); clients send PREFECT_API_AUTH_STRING.

Credentials (`Credentials`) come from the environment or a file of KEY=VALUE lines (mode 0600) and
reach the servers through their environment only: never argv (which `ps` shows), never a log line.

Used by `make serve` (`flows/serve.py`) and the real-server tests.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

LOOPBACK = "127.0.0.1"


class ServiceError(RuntimeError):
    """A server did not start, or stopped; the message names it and the tail of its log."""


# ---------------------------------------------------------------------------------------------------
# credentials

@dataclass(frozen=True)
class Credentials:
    """Secrets of the local stack. Field names are the environment variables that carry them."""
    DISTILLERY_PG_PASSWORD: str          # PostgreSQL roles: the superuser, mlflow and prefect
    MLFLOW_TRACKING_USERNAME: str        # the MLflow admin user; MLflow's client reads both variables
    MLFLOW_TRACKING_PASSWORD: str
    MLFLOW_FLASK_SERVER_SECRET_KEY: str  # signs the basic-auth app's sessions (CSRF)
    PREFECT_API_AUTH_STRING: str         # "user:password", the Prefect server's and its clients'

    @classmethod
    def load(cls, path: str | os.PathLike | None, env: dict[str, str] | None = None) -> "Credentials":
        """Each value from the environment, else from `path`; the missing ones are generated and
        saved to `path` (mode 0600), so a restarted stack keeps its passwords."""
        env = os.environ if env is None else env
        stored = read_env_file(path) if path and Path(path).is_file() else {}
        values, generated = {}, False
        for f in dataclasses.fields(cls):
            value = env.get(f.name) or stored.get(f.name)
            if not value:
                value = "admin" if f.name == "MLFLOW_TRACKING_USERNAME" else secrets.token_urlsafe(24)
                if f.name == "PREFECT_API_AUTH_STRING":
                    value = f"admin:{value}"
                generated = True
            values[f.name] = value
        creds = cls(**values)
        if path and generated:
            write_env_file(path, {**stored, **values})
        return creds

    def env(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    def secrets(self) -> list[str]:
        """The values that must never appear in a log, a param, a tag or a report."""
        return [self.DISTILLERY_PG_PASSWORD, self.MLFLOW_TRACKING_PASSWORD, self.MLFLOW_FLASK_SERVER_SECRET_KEY,
                self.PREFECT_API_AUTH_STRING.partition(":")[2]]


def read_env_file(path: str | os.PathLike) -> dict[str, str]:
    out = {}
    for line in Path(path).read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#"):
            out[key.strip()] = value.strip()
    return out


def write_env_file(path: str | os.PathLike, values: dict[str, str]) -> None:
    """Written 0600 from the first byte (not chmod'ed afterwards), via a temp file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("".join(f"{k}={v}\n" for k, v in values.items()))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# processes

@dataclass
class Service:
    """A started server: its process (a session leader), where it answers and where it logs."""
    name: str
    proc: subprocess.Popen
    url: str
    log: Path
    stop_command: list[str] | None = None   # e.g. `pg_ctl stop`, instead of a signal
    pids: list[int] = field(default_factory=list)  # the tree at start-up, to check nothing is left
    stop_timeout: float = 30.0   # how long `stop` waits for a clean exit before SIGKILL

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float | None = None) -> float:
        """SIGTERM to the process group (or the stop command), SIGKILL after `timeout`; then SIGKILL
        to whatever of the process's tree is left, in its group or not (Prefect starts flow runs in
        sessions of their own). Returns the seconds it took."""
        timeout = self.stop_timeout if timeout is None else timeout
        t0 = time.monotonic()
        descendants = _tree(self.proc.pid)[1:]
        if self.proc.poll() is None:
            if self.stop_command:
                subprocess.run(self.stop_command, capture_output=True, timeout=timeout)
            else:
                _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        _signal_group(self.proc.pid, signal.SIGKILL)  # stragglers left in the group
        _kill(alive(descendants))
        return time.monotonic() - t0

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def spawn(name: str, cmd: list[str], log: Path, env: dict[str, str], cwd: str | os.PathLike | None = None,
          user: str | None = None) -> subprocess.Popen:
    """Starts `cmd` in a new session with stdout/stderr to `log`; as `user` via runuser when given."""
    log.parent.mkdir(parents=True, exist_ok=True)
    if user:
        cmd = ["runuser", "-u", user, "--", *cmd]
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=cwd, start_new_session=True)


def wait_until(check: Callable[[], bool], service: Service, timeout: float) -> float:
    """Polls `check` until it passes; fails with the log's tail if the process dies or time runs out."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if service.proc.poll() is not None and not service.stop_command:
            raise ServiceError(f"{service.name} exited with status {service.proc.returncode}; "
                               f"log {service.log}:\n{service.log_tail()}")
        with contextlib.suppress(Exception):
            if check():
                return time.monotonic() - t0
        time.sleep(0.25)
    raise ServiceError(f"{service.name} did not answer within {timeout:.0f} s; log {service.log}:\n"
                       f"{service.log_tail()}")


def http_status(url: str, auth: tuple[str, str] | None = None, timeout: float = 5.0) -> int:
    import httpx
    return httpx.get(url, auth=auth, timeout=timeout).status_code


# settings that would point a server (or a client) at another stack, or carry another stack's secrets
CLIENT_SETTINGS = ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING", "PREFECT_HOME",
                   "PREFECT_PROFILES_PATH", "PREFECT_SERVER_API_AUTH_STRING", "PREFECT_SERVER_DATABASE_",
                   "MLFLOW_TRACKING_", "MLFLOW_AUTH_", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD",
                   "DISTILLERY_PG_PASSWORD")


def base_env(**extra: str) -> dict[str, str]:
    """This process's environment without another stack's addresses and secrets, plus `extra`.
    Tuning settings pass through (e.g. PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLIENT_SETTINGS)}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", **extra)
    return env


def bin_path(name: str) -> str:
    """A console script of this environment (beside sys.executable), else the one on PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


# ---------------------------------------------------------------------------------------------------
# PostgreSQL

def postgres_bin(name: str) -> str:
    """A PostgreSQL server program: from PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    for version_dir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (version_dir / name).exists():
            return str(version_dir / name)
    raise ServiceError(f"PostgreSQL's {name} not found: install it (Debian: apt-get install postgresql; "
                       f"`make system-deps` does)")


def _pg_user() -> str | None:
    """PostgreSQL refuses to run as root; as root we run it as the `postgres` system user."""
    return "postgres" if os.geteuid() == 0 else None


def start_postgres(data_dir: Path, port: int, password: str, host: str = LOOPBACK,
                   databases: dict[str, str] | None = None, timeout: float = 60.0) -> Service:
    """Initialises `data_dir` once (SCRAM-SHA-256 for every connection) and starts the server.

    `databases` maps database names to their owner roles; each role logs in with `password`.
    The socket lives in the data directory, so nothing is written to /var/run.
    """
    user = _pg_user()
    data_dir = Path(data_dir).resolve()
    log = data_dir.parent / "postgres.log"
    if not (data_dir / "PG_VERSION").exists():
        _initdb(data_dir, password, user)
    env = base_env(PGPASSWORD=password)
    cmd = [postgres_bin("postgres"), "-D", str(data_dir), "-p", str(port), "-k", str(data_dir),
           "-c", f"listen_addresses={host}"]
    svc = Service("postgres", spawn("postgres", cmd, log, env, user=user),
                  url=f"postgresql://{host}:{port}", log=log,
                  stop_command=_as_user(user, [postgres_bin("pg_ctl"), "stop", "-D", str(data_dir), "-m", "fast", "-w"]))
    wait_until(lambda: _pg_connect(host, port, "postgres", password, "postgres") is not None, svc, timeout)
    svc.pids = _tree(svc.pid)
    for db, owner in (databases or {}).items():
        ensure_database(host, port, password, db, owner, password)
    return svc


def _as_user(user: str | None, cmd: list[str]) -> list[str]:
    return ["runuser", "-u", user, "--", *cmd] if user else cmd


def _initdb(data_dir: Path, password: str, user: str | None) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    if user:
        shutil.chown(data_dir, user, user)
        # the server runs as `user`: it must be able to reach its data directory
        probe = subprocess.run(["runuser", "-u", user, "--", "test", "-x", str(data_dir)], capture_output=True)
        if probe.returncode:
            raise ServiceError(f"{data_dir}: the {user} user cannot reach this directory (a parent is not "
                               f"world-executable); choose a state directory under /var/tmp or /srv")
    pwfile = data_dir.parent / ".pg-superuser-password"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    if user:
        shutil.chown(pwfile, user, user)
    try:
        proc = subprocess.run(_as_user(user, [postgres_bin("initdb"), "-D", str(data_dir), "-U", "postgres",
                                              "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8",
                                              "--no-locale"]),
                              capture_output=True, text=True)
    finally:
        pwfile.unlink(missing_ok=True)
    if proc.returncode:
        raise ServiceError(f"initdb {data_dir} failed: {proc.stderr.strip()[-2000:]}")


def _pg_connect(host: str, port: int, user: str, password: str, dbname: str):
    import psycopg2
    conn = psycopg2.connect(host=host, port=port, user=user, password=password, dbname=dbname, connect_timeout=3)
    conn.autocommit = True
    return conn


def ensure_database(host: str, port: int, superuser_password: str, db: str, owner: str, owner_password: str) -> None:
    """Creates the role and the database it owns, if missing. The password travels as a query
    parameter, never inside the statement text that PostgreSQL could log."""
    from psycopg2 import sql
    with contextlib.closing(_pg_connect(host, port, "postgres", superuser_password, "postgres")) as conn:
        cur = conn.cursor()
        cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (owner,))
        if not cur.fetchone():
            cur.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(owner)))
        # PASSWORD cannot take a bind parameter; encrypt client-side so the cleartext never reaches
        # the server (or its statement log)
        cur.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(
            sql.Identifier(owner), sql.Literal(_scram_verifier(conn, owner_password, owner))))
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
        if not cur.fetchone():
            cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), sql.Identifier(owner)))


def _scram_verifier(conn, password: str, user: str) -> str:
    """libpq's PQencryptPasswordConn: the SCRAM-SHA-256 verifier PostgreSQL stores for a password."""
    from psycopg2.extensions import encrypt_password
    return encrypt_password(password, user, conn, "scram-sha-256")


# ---------------------------------------------------------------------------------------------------
# MLflow server

def start_mlflow(state_dir: Path, port: int, backend_uri: str, creds: Credentials, host: str = LOOPBACK,
                 pg_password: str | None = None, auth_uri: str | None = None, timeout: float = 180.0) -> Service:
    """`mlflow server` on `backend_uri` (a PostgreSQL URI without its password: libpq reads
    PGPASSWORD) with proxied artifacts under `state_dir/mlartifacts` and, when `auth_uri` names a
    database for its users, the basic-auth app (its own database: both keep an `alembic_version`)."""
    state_dir = Path(state_dir).resolve()
    env = base_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    if pg_password:
        env["PGPASSWORD"] = pg_password
    cmd = [bin_path("mlflow"), "server", "--backend-store-uri", backend_uri,
           "--artifacts-destination", (state_dir / "mlartifacts").as_uri(), "--serve-artifacts",
           "--host", host, "--port", str(port), "--workers", "1"]
    if auth_uri:
        ini = state_dir / "mlflow-auth.ini"
        ini.write_text("[mlflow]\ndefault_permission = READ\n"
                       f"database_uri = {auth_uri}\n"
                       f"admin_username = {creds.MLFLOW_TRACKING_USERNAME}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=creds.MLFLOW_TRACKING_PASSWORD,
                   MLFLOW_FLASK_SERVER_SECRET_KEY=creds.MLFLOW_FLASK_SERVER_SECRET_KEY)
        cmd += ["--app-name", "basic-auth"]
    url = f"http://{host}:{port}"
    svc = Service("mlflow", spawn("mlflow", cmd, state_dir / "mlflow.log", env), url=url, log=state_dir / "mlflow.log")
    login = (creds.MLFLOW_TRACKING_USERNAME, creds.MLFLOW_TRACKING_PASSWORD) if auth_uri else None
    # /health answers before the stores are ready; an authenticated API call proves both
    wait_until(lambda: http_status(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", login) == 200,
               svc, timeout)
    svc.pids = _tree(svc.pid)
    return svc


# ---------------------------------------------------------------------------------------------------
# Prefect server and worker

def start_prefect(state_dir: Path, port: int, creds: Credentials | None, database_url: str | None = None,
                  host: str = LOOPBACK, extra_env: dict[str, str] | None = None, services: bool = True,
                  home: Path | None = None, timeout: float = 180.0) -> Service:
    """`prefect server start` on `database_url` (PostgreSQL via asyncpg; default SQLite in its home,
    `state_dir/prefect-server` unless `home` says otherwise), with its API auth string when `creds`
    are given, and without the scheduler and other services when `services` is False."""
    state_dir = Path(state_dir).resolve()
    env = base_env(PREFECT_HOME=str(home or state_dir / "prefect-server"), **(extra_env or {}))
    login = None
    if creds is not None:
        env.update(PREFECT_SERVER_API_AUTH_STRING=creds.PREFECT_API_AUTH_STRING,
                   PREFECT_API_AUTH_STRING=creds.PREFECT_API_AUTH_STRING)
        user, _, pw = creds.PREFECT_API_AUTH_STRING.partition(":")
        login = (user, pw)
    if database_url:
        env["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = database_url
    cmd = [bin_path("prefect"), "server", "start", "--host", host, "--port", str(port), "--no-ui"]
    if not services:
        cmd.append("--no-services")
    url = f"http://{host}:{port}/api"
    svc = Service("prefect", spawn("prefect", cmd, state_dir / "prefect.log", env), url=url,
                  log=state_dir / "prefect.log")
    wait_until(lambda: http_status(f"{url}/health", login) == 200 and http_status(f"{url}/ready", login) == 200,
               svc, timeout)
    svc.pids = _tree(svc.pid)
    return svc


def client_env(prefect: Service | None, mlflow: Service | None, creds: Credentials, **extra: str) -> dict[str, str]:
    """What a Prefect/MLflow client process (a worker, `prefect deploy`, a flow) needs to reach the stack."""
    env = base_env(**extra)
    if prefect is not None:
        env.update(PREFECT_API_URL=prefect.url, PREFECT_API_AUTH_STRING=creds.PREFECT_API_AUTH_STRING)
    if mlflow is not None:
        env.update(MLFLOW_TRACKING_URI=mlflow.url, MLFLOW_TRACKING_USERNAME=creds.MLFLOW_TRACKING_USERNAME,
                   MLFLOW_TRACKING_PASSWORD=creds.MLFLOW_TRACKING_PASSWORD)
    return env


def start_worker(pool: str, env: dict[str, str], log: Path, cwd: str | os.PathLike | None = None,
                 timeout: float = 120.0, grace: float = 30.0) -> Service:
    """`python -m flows.worker start --pool POOL` (a Prefect process worker that stops on SIGTERM,
    giving its flow runs `grace` seconds to end)."""
    cmd = [sys.executable, "-m", "flows.worker", "start", "--pool", pool, "--grace", f"{grace:g}"]
    # `stop` must outwait the worker's own grace, or the worker dies before it can SIGKILL a flow run
    svc = Service("worker", spawn("worker", cmd, log, env, cwd=cwd), url=env.get("PREFECT_API_URL", ""), log=log,
                  stop_timeout=grace + 15.0)
    wait_until(lambda: "started" in log.read_text(errors="replace"), svc, timeout)
    svc.pids = _tree(svc.pid)
    return svc


def _tree(pid: int) -> list[int]:
    import psutil
    with contextlib.suppress(psutil.NoSuchProcess):
        p = psutil.Process(pid)
        return [pid, *(c.pid for c in p.children(recursive=True))]
    return [pid]


def alive(pids: list[int]) -> list[int]:
    """The PIDs among `pids` that still run (zombies count as gone)."""
    import psutil
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
    return out


@contextlib.contextmanager
def stopping(services: list[Service]) -> Iterator[list[Service]]:
    """Stops every service in `services` (in reverse order of start) when the block ends."""
    try:
        yield services
    finally:
        for svc in reversed(services):
            svc.stop()
