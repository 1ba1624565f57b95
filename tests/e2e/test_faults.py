"""Faults with real processes, each test on its own PostgreSQL database and its own redis-server:
a worker SIGKILLed in the middle of a merge job, and Redis restarted (losing its queue) while a job waits."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.flow import TINY, ok, upload_dataset, upload_recipe, wait_job
from tests.e2e.services import start_api, start_worker, store_is_clean, wait_for
from workers.celery_app import CeleryDispatcher, make_celery

pytestmark = [pytest.mark.slow, pytest.mark.services]


def _message_id(database_url: str, job_id: str) -> str:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    with engine.connect() as c:
        mid = c.execute(text("SELECT celery_id FROM jobs WHERE id = :id"), {"id": job_id}).scalar_one()
    engine.dispose()
    return mid


def test_worker_killed_mid_merge_job_is_finished_by_another_once(services, tmp_path):
    env, _ = services
    api, client = start_api(env, tmp_path)
    first = start_worker(env, tmp_path, 1)
    second = None
    try:
        dataset_id, local = upload_dataset(client, tmp_path)
        a = upload_recipe(client, local, tmp_path, dataset_id)
        b = upload_recipe(client, local, tmp_path, dataset_id, "other", seed=3)
        # Fine-tuning after the merge makes the merge task long enough to be killed in the middle.
        job = ok(client.post("/merge-jobs", json={"method": "uniform", "model_ids": [a, b], "evaluate": False,
                                                  "finetune_epochs": 20}), 202)
        path = f"/merge-jobs/{job['id']}"
        wait_job(client, path, until=("running",))
        wait_for(lambda: ok(client.get(path))["progress"]["fraction"] > 0.1, 30, "the merge to be under way")
        first.kill()  # SIGKILL to the worker and its pool process: no ack, no cleanup, no goodbye
        assert ok(client.get(path))["status"] == "running"  # nobody knows yet

        second = start_worker(env, tmp_path, 2)
        done = wait_job(client, path, timeout=60)
        assert done["status"] == "succeeded", done["error"]
        assert done["attempts"] == 2
        merged = ok(client.get("/models", params={"kind": "merged"}))
        assert [m["id"] for m in merged] == [done["result_model_id"]]
        assert merged[0]["merge"]["finetune"]["epochs"] == 20
        stored = store_is_clean(Path(env["RECMERGE_DATA_DIR"]))
        assert merged[0]["sha256"] in stored
        leftovers = list((Path(env["RECMERGE_DATA_DIR"]) / "tmp" / "jobs").glob(f"{job['id']}.*"))
        assert leftovers == []  # the killed attempt's scratch files went with the new attempt
    except BaseException:
        print("--- api ---\n" + api.tail(), "\n--- worker 1 ---\n" + first.tail(),
              "\n--- worker 2 ---\n" + (second.tail() if second else ""))
        raise
    finally:
        client.close()
        for p in (api, first, second):
            if p is not None:
                p.stop()


def test_job_queued_across_a_redis_restart_is_sent_again(services, tmp_path):
    env, redis = services
    api, client = start_api(env, tmp_path)
    worker = None
    try:
        dataset_id, _ = upload_dataset(client, tmp_path)
        job = ok(client.post("/train-jobs", json={"dataset_id": dataset_id, **TINY, "epochs": 1}), 202)
        path = f"/jobs/{job['id']}"
        import redis as redis_client

        r = redis_client.Redis.from_url(redis.url)
        assert r.llen("gpu") == 1  # the message waits in Redis: no worker runs yet
        message_id = _message_id(env["RECMERGE_DATABASE_URL"], job["id"])
        broker = CeleryDispatcher(make_celery(redis.url))
        assert broker.pending(message_id) is True  # what keeps the sweeper from sending it twice
        redis.restart()  # no persistence: the queue is gone
        assert r.llen("gpu") == 0
        assert broker.pending(message_id) is False
        worker = start_worker(env, tmp_path)
        done = wait_job(client, path, timeout=45)
        assert done["status"] == "succeeded", done["error"]
        assert done["attempts"] == 1
        assert len(ok(client.get("/models"))) == 1
    except BaseException:
        print("--- api ---\n" + api.tail(), "\n--- worker ---\n" + (worker.tail() if worker else ""))
        raise
    finally:
        client.close()
        api.stop()
        if worker is not None:
            worker.stop()
