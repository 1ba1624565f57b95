"""The whole flow against real processes: uvicorn + a Celery worker on PostgreSQL and Redis, started with
the commands of docker-compose.yml; and the same flow in embedded mode (one process, SQLite)."""

from __future__ import annotations

import pytest

from tests.e2e.flow import run_flow
from tests.e2e.services import machine_redis, migrate, service_env, start_api, start_worker

pytestmark = [pytest.mark.slow, pytest.mark.services]


def test_flow_with_celery_worker_on_postgres_and_redis(tmp_path, postgres_url):
    with machine_redis() as broker:
        env = service_env(tmp_path, postgres_url, broker)
        migrate(env, tmp_path / "migrate.log")
        worker = start_worker(env, tmp_path)
        api, client = start_api(env, tmp_path)
        try:
            run_flow(client, tmp_path)
        except BaseException:
            print("--- api ---\n" + api.tail(), "\n--- worker ---\n" + worker.tail())
            raise
        finally:
            client.close()
            api.stop()
            worker.stop()


def test_flow_embedded_on_sqlite(tmp_path):
    env = service_env(tmp_path, None, None)  # nothing set: SQLite, local store, in-process runner
    api, client = start_api(env, tmp_path)
    try:
        run_flow(client, tmp_path)
    except BaseException:
        print("--- api ---\n" + api.tail())
        raise
    finally:
        client.close()
        api.stop()
