"""Real servers for tests, each on 127.0.0.1 at a free port, each stopped by the PIDs it started (also
on failure): an S3-compatible object store (`moto` in server mode), PostgreSQL (the distribution's
server binaries, e.g. Debian's `postgresql` package that `.ci/run` installs), and `mlflow server`."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def stop_tree(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Stop `proc` and every process it started (found by PID through psutil, not by name): `sig` first,
    SIGKILL for whatever is left after `timeout`."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    """Wait until `url` answers (any HTTP status); fail with the log's tail if `proc` exits or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"{url} did not answer (exit code {proc.poll()}):\n{log.read_text(errors='replace')[-3000:]}")


# ------------------------------------------------------------------------------------------------
# S3-compatible object store


@dataclass
class S3Store:
    """A bucket on a local S3-compatible server. `env` is what a client needs — the endpoint
    (``AWS_ENDPOINT_URL``, read by pyarrow, boto3 and so by Ray and MLflow) and dummy credentials that
    the tests treat as secrets."""

    endpoint: str
    bucket: str
    env: dict[str, str] = field(default_factory=dict)

    def uri(self, path: str = "") -> str:
        return f"s3://{self.bucket}/{path}".rstrip("/")

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.env["AWS_DEFAULT_REGION"],
                            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"])

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()


@contextlib.contextmanager
def s3_server(root: Path, bucket: str = "alphadpo"):
    """`moto` in server mode on 127.0.0.1 (in memory) with `bucket` created; yields an `S3Store`."""
    root.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), root / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        wait_http(endpoint, proc, log, timeout=60)
        store = S3Store(endpoint, bucket, {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "alphadpo-test-key",
            "AWS_SECRET_ACCESS_KEY": f"moto-secret-{uuid.uuid4().hex}",
            "AWS_DEFAULT_REGION": "us-east-1",
        })
        store.client().create_bucket(Bucket=bucket)
        yield store
    finally:
        stop_tree(proc)


# ------------------------------------------------------------------------------------------------
# PostgreSQL


def postgres_bin() -> Path | None:
    """The newest PostgreSQL server's bin folder (Debian: /usr/lib/postgresql/VERSION/bin), or PATH's."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("postgres")
    return Path(on_path).parent if on_path else None


def _as_postgres_user():
    """(preexec_fn, owner uid/gid): PostgreSQL refuses to run as root, so as root its processes run as
    the `postgres` system user (created by the distribution's package); otherwise as ourselves."""
    if os.geteuid() != 0:
        return None, None
    import pwd

    user = pwd.getpwnam("postgres")

    def demote():
        os.setgid(user.pw_gid)
        os.initgroups("postgres", user.pw_gid)
        os.setuid(user.pw_uid)

    return demote, (user.pw_uid, user.pw_gid)


@contextlib.contextmanager
def postgres_server(root: Path, databases: tuple[str, ...] = ("mlflow",)):
    """A throwaway PostgreSQL on 127.0.0.1 (its own data folder, unix socket folder and port) with
    `databases` created; yields ``postgresql://postgres@127.0.0.1:PORT`` (append ``/DATABASE``).

    Missing server binaries skip the test on a developer's machine and fail it under CI (``.ci/run``
    installs Debian's `postgresql`)."""
    pg = postgres_bin()
    if pg is None:
        why = "PostgreSQL server binaries not found (Debian: apt-get install postgresql)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    root.mkdir(parents=True, exist_ok=True)
    demote, owner = _as_postgres_user()
    # pytest's temp folders are private to their owner, which the `postgres` user is not: as root the
    # data folder lives in a folder of its own under the system temp dir, owned by `postgres`.
    home = Path(tempfile.mkdtemp(prefix="alphadpo-pg-")) if owner else root / "pg"
    data, sockets = home / "data", home / "run"
    home.mkdir(exist_ok=True)
    if owner:
        os.chown(home, *owner)
    port, log = free_port(), root / "postgres.log"
    proc = None
    try:
        subprocess.run([str(pg / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                        "--no-sync"], check=True, capture_output=True, preexec_fn=demote, cwd=home)
        (sockets).mkdir()
        if owner:
            os.chown(sockets, *owner)
        with open(log, "wb") as out:
            proc = subprocess.Popen([str(pg / "postgres"), "-D", str(data), "-h", "127.0.0.1", "-p", str(port),
                                     "-k", str(sockets), "-c", "fsync=off", "-c", "full_page_writes=off"],
                                    stdout=out, stderr=subprocess.STDOUT, preexec_fn=demote, cwd=home)
        url = f"postgresql://postgres@127.0.0.1:{port}"
        _create_databases(url, databases, proc, log)
        yield url
    finally:
        if proc is not None:
            stop_tree(proc, signal.SIGINT)  # PostgreSQL's "fast" shutdown
        if owner:
            shutil.rmtree(home, ignore_errors=True)


def _create_databases(url: str, databases: tuple[str, ...], proc: subprocess.Popen, log: Path) -> None:
    import psycopg

    deadline = time.time() + 60
    while True:
        try:
            connection = psycopg.connect(f"{url}/postgres", connect_timeout=2, autocommit=True)
            break
        except psycopg.OperationalError:
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"PostgreSQL did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.3)
    with connection:
        for name in databases:
            connection.execute(f'CREATE DATABASE "{name}"')


# ------------------------------------------------------------------------------------------------
# MLflow tracking server


# MLflow 3 starts a job runner and seven huey consumer processes per server for its GenAI jobs, which
# nothing here uses: they cost ~6 CPU-s to start and poll at ~0.8 of a core for as long as the server runs
# (measured on MLflow 3.17, 2 cores); without them an idle server takes ~0.01 of a core.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def mlflow_server_command(root: Path, port: int, backend_store_uri: str | None = None,
                          artifacts_destination: str | None = None) -> list[str]:
    """`mlflow server` on 127.0.0.1:`port`, one worker, serving its artifacts; defaults: a SQLite store and an
    artifact folder under `root`. Run it with `MLFLOW_SERVER_ENV` in its environment."""
    return [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", backend_store_uri or f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination", artifacts_destination or str(root / "artifacts")]


@contextlib.contextmanager
def mlflow_server(root: Path, backend_store_uri: str | None = None, artifacts_destination: str | None = None,
                  env: dict[str, str] | None = None, admin: tuple[str, str] | None = None,
                  auth_database_uri: str | None = None, port: int | None = None):
    """`mlflow server` on 127.0.0.1 (one worker) serving its artifacts (proxied: clients need no access to
    the artifact store); defaults: a SQLite store and an artifact folder under `root`. ``admin``
    (user, password) turns on MLflow's basic-auth app, its users kept in `auth_database_uri` (default:
    SQLite under `root`). Yields the server's URI."""
    root.mkdir(parents=True, exist_ok=True)
    port, log = port or free_port(), root / "mlflow-server.log"
    command = mlflow_server_command(root, port, backend_store_uri, artifacts_destination)
    server_env = {**os.environ, **MLFLOW_SERVER_ENV, **(env or {})}
    if admin:
        config, users = root / "basic_auth.ini", auth_database_uri or f"sqlite:///{root / 'auth.db'}"
        config.write_text("[mlflow]\ndefault_permission = READ\n"
                          f"database_uri = {users}\n"
                          f"admin_username = {admin[0]}\nadmin_password = {admin[1]}\n"
                          "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
                          # checked passwords cached for a minute: each check is a slow PBKDF2 hash
                          "auth_cache_ttl_seconds = 60\n")
        config.chmod(0o600)
        command += ["--app-name", "basic-auth"]
        server_env["MLFLOW_AUTH_CONFIG_PATH"] = str(config)
        server_env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = uuid.uuid4().hex  # CSRF key the auth app requires
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=server_env, cwd=root)
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_http(f"{uri}/health", proc, log)
        yield uri
    finally:
        stop_tree(proc)
