"""Each test owns a fresh embedded service: SQLite file, local store, in-process runner."""

from __future__ import annotations

import time

import pytest

from app.migrate import upgrade
from core import jobs
from core.settings import Settings
from workers.runner import Background


@pytest.fixture
def settings(tmp_path):
    return Settings(DATA_DIR=tmp_path / "svc", BROKER_URL=None, DATABASE_URL="", STORE_URL="",
                    SWEEP_INTERVAL_S=0.2, HEARTBEAT_TIMEOUT_S=2.0, MAX_ATTEMPTS=2)


@pytest.fixture
def bg(settings):
    upgrade(settings.DATABASE_URL)
    b = Background(settings)  # the sweeper is started by the tests that want it
    yield b
    b.stop()


def submit(res, kind: str, payload: dict, **kw) -> str:
    with res.session() as s, s.begin():
        job = jobs.create(s, kind, payload, **kw)
    if not kw.get("children"):
        res.dispatch(job.id, kind)
    return job.id


def wait(res, job_id: str, timeout: float = 30.0, until=jobs.TERMINAL):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with res.session() as s:
            job = s.get(jobs.Job, job_id)
        if job.status in until:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job.status} ({job.stage}) after {timeout} s")
