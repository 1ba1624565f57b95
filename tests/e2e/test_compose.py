"""docker-compose.yml and the Dockerfile: parsed by docker-compose itself (no Docker engine needed)
and checked against what the code expects: settings names, the Celery queue, shared artifacts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from core.settings import Settings
from tests.e2e.compose import COMPOSE, ROOT
from workers.celery_app import QUEUE

DC = shutil.which("docker-compose")
needs_dc = pytest.mark.skipif(DC is None, reason="docker-compose is not installed (Debian package docker-compose; "
                                                  "`make sysdeps` installs it)")


def _config(env_extra: dict, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RECMERGE_", "POSTGRES_", "DEPLOY_"))}
    files = [a for f in overrides for a in ("-f", str(ROOT / f))]
    return subprocess.run([DC, "-f", str(COMPOSE), *files, "config"], cwd=ROOT, env={**env, **env_extra},
                          capture_output=True, text=True, timeout=60)


@needs_dc
def test_compose_config_is_valid_and_complete():
    done = _config({"RECMERGE_API_TOKEN": "s3cret"})
    assert done.returncode == 0, done.stderr
    svc = yaml.safe_load(done.stdout)["services"]
    assert set(svc) == {"redis", "postgres", "migrate", "api", "worker"}
    for name in ("redis", "postgres", "api", "worker"):
        assert svc[name]["healthcheck"]["test"], name

    known = set(Settings.model_fields)
    for name in ("migrate", "api", "worker"):
        env = svc[name]["environment"]
        unknown = {k for k in env if k.startswith("RECMERGE_") and k.removeprefix("RECMERGE_") not in known}
        assert not unknown, f"{name}: {unknown} are not settings"
        assert env["RECMERGE_API_TOKEN"] == "s3cret"
        assert env["RECMERGE_BROKER_URL"].startswith("redis://redis:")
        assert env["RECMERGE_DATABASE_URL"].startswith("postgresql+psycopg2://") and "@postgres:" in env[
            "RECMERGE_DATABASE_URL"]

    # API and workers see the same artifacts: one named volume, mounted where DATA_DIR and the store are.
    for name in ("api", "worker"):
        env = svc[name]["environment"]
        mounts = [v if isinstance(v, str) else f"{v['source']}:{v['target']}" for v in svc[name]["volumes"]]
        assert any(m.startswith("artifacts:/data") for m in mounts), mounts
        assert env["RECMERGE_DATA_DIR"] == "/data" and env["RECMERGE_STORE_URL"].startswith("file:///data/")

    worker = svc["worker"]
    assert worker["command"][:5] == ["celery", "-A", "workers.celery_app", "worker", "-Q"]
    assert worker["command"][5] == QUEUE
    # The GPU reservation is an override: the engine refuses a worker it cannot give a GPU to.
    assert "deploy" not in worker
    gpu = _config({"RECMERGE_API_TOKEN": "s3cret"}, "docker-compose.gpu.yml")
    assert gpu.returncode == 0, gpu.stderr
    devices = yaml.safe_load(gpu.stdout)["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    for name in ("api", "worker"):
        assert svc[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert svc[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert svc["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


@needs_dc
def test_compose_refuses_to_start_without_an_api_token():
    done = _config({})
    assert done.returncode != 0
    assert "set RECMERGE_API_TOKEN" in done.stderr


def test_dockerfile_copies_every_package_the_distribution_holds():
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in include}
    copied = set(re.findall(r"^COPY (\w+) \./\1$", (ROOT / "Dockerfile").read_text(), flags=re.M))
    assert packages <= copied, f"Dockerfile does not copy {packages - copied}"
    assert "alembic.ini" in (ROOT / "Dockerfile").read_text()


@needs_dc
def test_local_override_keeps_off_the_hosts_services():
    """deploy/compose.local.yml (make deploy-check): host networking, so every port is the host's — none
    may be PostgreSQL's or Redis's standard one, which the test-suite's own servers hold."""
    done = _config({"RECMERGE_API_TOKEN": "s3cret"}, "deploy/compose.local.yml")
    assert done.returncode == 0, done.stderr
    svc = yaml.safe_load(done.stdout)["services"]
    assert {s["network_mode"] for s in svc.values()} == {"host"}
    assert {s["image"] for s in svc.values()} == {"recmerge:local", "recmerge-postgres:local", "recmerge-redis:local"}
    for name in ("migrate", "api", "worker"):
        env = svc[name]["environment"]
        assert "@127.0.0.1:15432/" in env["RECMERGE_DATABASE_URL"], env
        assert env["RECMERGE_BROKER_URL"] == "redis://127.0.0.1:16379/0"
    assert svc["postgres"]["command"][-2:] == ["-p", "15432"]
    assert svc["redis"]["command"][-2:] == ["--port", "16379"] and "16379" in svc["redis"]["healthcheck"]["test"]
    assert svc["api"]["command"][-2:] == ["--port", "18000"] and "18000" in svc["api"]["healthcheck"]["test"][-1]
