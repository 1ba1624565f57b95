"""The whole flow against real processes: uvicorn + a Celery worker on PostgreSQL and Redis, started with
the commands of docker-compose.yml; and the same flow in embedded mode (one process, SQLite)."""

from __future__ import annotations

import pytest

from tests.e2e.flow import run_flow
from tests.e2e.services import machine_redis, migrate, service_env, start_api, start_worker

pytestmark = [pytest.mark.slow, pytest.mark.services]


def _fisher_workers(database_url: str) -> list[str]:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    with engine.connect() as c:
        rows = c.execute(text("SELECT worker FROM jobs WHERE kind = 'fisher'")).scalars().all()
    engine.dispose()
    return rows


def test_flow_with_celery_workers_on_postgres_and_redis(tmp_path, postgres_url):
    with machine_redis() as broker:
        env = service_env(tmp_path, postgres_url, broker)
        migrate(env, tmp_path / "migrate.log")
        workers = [start_worker(env, tmp_path, n) for n in (1, 2)]
        api, client = start_api(env, tmp_path)
        try:
            run_flow(client, tmp_path)
            # The two Fisher jobs of the merge went to the two workers, one each (prefetch 1, acks late).
            names = [w.split("@")[0] for w in _fisher_workers(postgres_url)]
            assert len(names) == 2 and len(set(names)) == 2, names
        except BaseException:
            print("--- api ---\n" + api.tail(), *(f"\n--- {w.name} ---\n" + w.tail() for w in workers))
            raise
        finally:
            client.close()
            api.stop()
            for w in workers:
                w.stop()


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
