"""Real services for tests: a PostgreSQL database, a redis-server and an S3 server of the test's own.

Import the fixtures into a conftest.py (`from tests.conftest_services import postgres_url, ...`).
Each one is created for the test and removed after it, so tests never touch the machine's data.
Without the service a test skips — unless RECMERGE_REQUIRE_SERVICES=1 (CI), where it fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"


def missing_service(what: str) -> None:
    if os.environ.get("RECMERGE_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{what} is required (RECMERGE_REQUIRE_SERVICES=1) but not available")
    pytest.skip(f"{what} not available")


def free_port_number() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")


@pytest.fixture
def free_port() -> int:
    return free_port_number()


# --- PostgreSQL -----------------------------------------------------------------------------------
def _pg_admin():
    import psycopg2

    try:
        conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=3)
    except psycopg2.OperationalError as e:
        missing_service(f"PostgreSQL on {PG_HOST}:{PG_PORT} ({str(e).strip()})")
    conn.autocommit = True
    return conn


@pytest.fixture
def postgres_url():
    """URL of a fresh, empty database `recmerge_test_<random>`, dropped after the test."""
    name = f"recmerge_test_{uuid.uuid4().hex[:12]}"
    admin = _pg_admin()
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


# --- Redis ----------------------------------------------------------------------------------------
class RedisServer:
    """A redis-server of the test's own on a free loopback port; `restart()` keeps the port."""

    def __init__(self, workdir: Path):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            missing_service("redis-server")
        self.workdir = workdir
        self.port = free_port_number()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    return redis_server.url


# --- S3 (moto in server mode) ---------------------------------------------------------------------
@pytest.fixture
def s3_endpoint(monkeypatch):
    """An S3-compatible server on loopback with a bucket `recmerge-test`; AWS_* set to dummy values."""
    try:
        import flask  # noqa: F401  (moto's server mode needs the moto[server] extra)
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        missing_service(f"moto's S3 server ({e})")
    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="recmerge-test")
    yield endpoint
    server.stop()
