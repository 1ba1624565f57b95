"""The Celery app's reliability settings (SPEC §8): what makes a dead worker's message survive."""

from datetime import timedelta

from tests.conftest_services import redis_server, redis_url  # noqa: F401
from workers.celery_app import QUEUE, TASKS, make_celery
from workers.tasks import BODIES


def test_reliability_settings():
    conf = make_celery("redis://127.0.0.1:1/0").conf
    assert conf.task_acks_late is True  # ack after the task: a worker that dies leaves the message
    assert conf.task_reject_on_worker_lost is True  # a pool process killed mid-task requeues it
    assert conf.worker_prefetch_multiplier == 1  # a worker holds only the message it works on
    assert conf.task_default_queue == QUEUE == "gpu"
    assert conf.task_ignore_result is True and not conf.result_backend  # the database holds results
    assert conf.accept_content == ["json"]  # never pickle


def test_one_task_per_job_kind_on_the_gpu_queue():
    assert set(TASKS) == set(BODIES) == {"prepare", "train", "fisher", "merge", "evaluate"}
    app = make_celery("redis://127.0.0.1:1/0")
    for kind, task in TASKS.items():
        assert task.name == f"recmerge.{kind}"
        assert app.amqp.router.route({}, task.name)["queue"].name == QUEUE


def _deliver_and_die(broker_url: str, n: int) -> None:
    """A consumer that takes n messages without acknowledging them and is then killed: no ack, no
    restore on close — what a SIGKILLed worker leaves in kombu's unacked set."""
    import subprocess
    import sys

    code = ("import os, sys; from kombu import Connection\n"
            "ch = Connection(sys.argv[1]).default_channel\n"
            f"assert all(ch.basic_get('{QUEUE}', no_ack=False) for _ in range({n}))\n"
            "os._exit(0)\n")
    subprocess.run([sys.executable, "-c", code, broker_url], check=True, timeout=60)


def test_sweeper_drops_the_unacked_deliveries_of_killed_workers_once_their_jobs_ended_or_were_resent(
        tmp_path, redis_url):  # noqa: F811
    import redis

    from app.migrate import upgrade
    from core import jobs
    from core.db_models import Job
    from core.settings import Settings
    from workers.celery_app import CeleryDispatcher
    from workers.resources import Resources
    from workers.sweeper import sweep_once

    settings = Settings(DATA_DIR=tmp_path / "svc", BROKER_URL=redis_url, DATABASE_URL="", STORE_URL="",
                        HEARTBEAT_TIMEOUT_S=60)
    upgrade(settings.DATABASE_URL)
    res = Resources(settings, CeleryDispatcher(make_celery(redis_url)))
    ids = {}
    for name in ("running", "ended", "resent"):
        with res.session() as s, s.begin():
            ids[name] = jobs.create(s, "fisher", {}).id
        res.dispatch(ids[name], "fisher")
    with res.session() as s:
        first = {name: s.get(Job, jid).celery_id for name, jid in ids.items()}
    _deliver_and_die(redis_url, 3)
    r = redis.Redis.from_url(redis_url)
    assert r.hlen("unacked") == r.zcard("unacked_index") == 3 and r.llen(QUEUE) == 0

    with res.session() as s, s.begin():
        for name, status in (("running", "running"), ("ended", "succeeded"), ("resent", "queued")):
            s.get(Job, ids[name]).status = status
            s.get(Job, ids[name]).heartbeat_at = jobs.now()  # nobody is lost yet
    res.dispatch(ids["resent"], "fisher")  # as the sweeper does for a lost attempt: a new message id

    report = sweep_once(res)
    assert sorted(report["forgotten"]) == sorted([first["ended"], first["resent"]])
    held = res.dispatcher.held()
    assert [(m, j) for _, m, j, _ in held] == [(first["running"], ids["running"])]  # a live job's delivery stays
    assert r.zcard("unacked_index") == 1
    assert res.dispatcher.pending(first["running"]) is True
    assert r.llen(QUEUE) == 1  # the re-sent message waits for a worker
    assert sweep_once(res)["forgotten"] == []
    res.engine.dispose()


def test_a_queued_job_whose_delivery_outlived_the_heartbeat_timeout_is_sent_again(tmp_path, redis_url):  # noqa: F811
    """The worker took the message and died before claiming the job: the job stays queued and its message
    unacked, which `pending` reports as held. A live worker claims at once, so the sweeper drops a delivery
    older than the heartbeat timeout, and the next pass sends the job again."""
    import redis

    from app.migrate import upgrade
    from core import jobs
    from core.db_models import Job
    from core.settings import Settings
    from workers.celery_app import CeleryDispatcher
    from workers.resources import Resources
    from workers.sweeper import sweep_once

    settings = Settings(DATA_DIR=tmp_path / "svc", BROKER_URL=redis_url, DATABASE_URL="", STORE_URL="",
                        HEARTBEAT_TIMEOUT_S=60, SWEEP_INTERVAL_S=1)
    upgrade(settings.DATABASE_URL)
    res = Resources(settings, CeleryDispatcher(make_celery(redis_url)))
    with res.session() as s, s.begin():
        jid = jobs.create(s, "fisher", {}).id
    res.dispatch(jid, "fisher")
    _deliver_and_die(redis_url, 1)
    with res.session() as s, s.begin():
        message = s.get(Job, jid).celery_id
        s.get(Job, jid).heartbeat_at = jobs.now() - timedelta(seconds=30)  # sent 30 s ago
    r = redis.Redis.from_url(redis_url)
    assert sweep_once(res) == {"requeued": [], "failed": [], "resent": [], "released": [], "forgotten": []}
    assert res.dispatcher.pending(message) is True  # delivered 0 s ago: its worker may be claiming it now

    tag = r.hkeys("unacked")[0]
    r.zadd("unacked_index", {tag: r.zscore("unacked_index", tag) - 61})  # delivered 61 s ago
    assert sweep_once(res)["forgotten"] == [message]
    assert sweep_once(res)["resent"] == [jid]
    with res.session() as s:
        assert s.get(Job, jid).celery_id != message
    assert r.llen(QUEUE) == 1 and r.hlen("unacked") == 0
    res.engine.dispose()
