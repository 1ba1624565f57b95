"""Processes for end-to-end tests: the API and Celery workers started with the commands of
docker-compose.yml, and the machine's Redis (in an empty database number). A fresh PostgreSQL database
and a private redis-server come from tests/conftest_services.py. A missing service skips the test, or
fails it when RECMERGE_REQUIRE_SERVICES=1 (CI).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest_services import free_port_number, missing_service
from tests.e2e.compose import ROOT, command

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
BIN = Path(sys.executable).parent
TOKEN = "e2e-token"


@contextmanager
def machine_redis():
    """The machine's Redis, in a database number nobody uses (checked empty), flushed afterwards."""
    import redis

    try:
        for db in range(15, 0, -1):
            r = redis.Redis(REDIS_HOST, REDIS_PORT, db=db, socket_timeout=3)
            if r.dbsize() == 0:
                r.set("recmerge:e2e:claimed", "1")  # claim it before another test picks it too
                break
        else:
            missing_service("Redis on 6379 has no empty database number")
    except redis.RedisError as e:
        missing_service(f"Redis on {REDIS_HOST}:{REDIS_PORT} is not reachable: {e}")
    try:
        yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
    finally:
        r.flushdb()


def wait_for(check, timeout: float, what: str, every: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def service_env(tmp: Path, database_url: str | None, broker_url: str | None, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECMERGE_")}
    env.update(RECMERGE_DATA_DIR=str(tmp / "data"), RECMERGE_API_TOKEN=TOKEN, RECMERGE_SWEEP_INTERVAL_S="0.5",
               RECMERGE_HEARTBEAT_TIMEOUT_S="4", RECMERGE_MAX_ATTEMPTS="3", RECMERGE_TORCH_THREADS="1",
               PATH=f"{BIN}:{env.get('PATH', '')}", PYTHONPATH=str(ROOT))
    if database_url:
        env["RECMERGE_DATABASE_URL"] = database_url
    if broker_url:
        env["RECMERGE_BROKER_URL"] = broker_url
    env.update({k: str(v) for k, v in extra.items()})
    return env


class Proc:
    """A service process in its own process group, so a kill takes its children (the Celery pool) too."""

    def __init__(self, name: str, argv: list[str], env: dict, log: Path):
        self.name, self.log = name, log
        self._out = open(log, "ab")
        self.p = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT,
                                  start_new_session=True)

    def alive(self) -> bool:
        return self.p.poll() is None

    def kill(self, sig=signal.SIGKILL):
        if self.alive():
            os.killpg(self.p.pid, sig)
        self.p.wait(timeout=30)

    def stop(self):
        if self.alive():
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._out.close()

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def migrate(env: dict, log: Path) -> None:
    done = subprocess.run(command("migrate"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    log.write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stderr


def store_is_clean(data_dir: Path) -> list[str]:
    """Every stored object is whole: named by the sha256 of its bytes, no temporary leftovers."""
    objects = data_dir / "store" / "objects"
    names = []
    for f in objects.rglob("*"):
        if f.is_file():
            assert not f.name.startswith("."), f"temporary file left in the store: {f}"
            assert hashlib.sha256(f.read_bytes()).hexdigest() == f.name, f"partial object {f}"
            names.append(f.name)
    return names


def start_api(env: dict, tmp: Path) -> tuple[Proc, httpx.Client]:
    port = free_port_number()
    proc = Proc("api", command("api", port), env, tmp / "api.log")
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                          headers={"Authorization": f"Bearer {TOKEN}"})

    def up():
        if not proc.alive():
            raise AssertionError(f"the API exited:\n{proc.tail()}")
        try:
            return client.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, 60, "the API to answer /healthz")
    return proc, client


def start_worker(env: dict, tmp: Path, n: int = 1) -> Proc:
    argv = command("worker") + ["-n", f"w{n}-{uuid.uuid4().hex[:6]}@%h"]
    return Proc(f"worker{n}", argv, env, tmp / f"worker{n}.log")
