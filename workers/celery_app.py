"""The Celery app: `celery -A workers.celery_app worker -Q gpu` starts a worker.

Reliability comes from the database, not from Celery: a message only says "look at job X"; the job
row decides whether there is anything to do (core/jobs.py). Celery's part is not to lose work:
acks after the task (a worker that dies mid-task leaves its message to be delivered again), reject
when the pool process dies, one message per worker at a time (a long training never sits
reserved behind another). No result backend: results and progress live in the jobs table.
"""

from __future__ import annotations

import base64
import json
import logging

from celery import Celery

from core.settings import get_settings
from workers import attempt, resources
from workers.tasks import BODIES

QUEUE = "gpu"  # every job is compute; CPU-only workers may consume it too
log = logging.getLogger("recmerge.jobs")


def make_celery(broker_url: str | None) -> Celery:
    app = Celery("recmerge", broker=broker_url or "memory://", set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=QUEUE,
        task_routes={"recmerge.*": {"queue": QUEUE}},
        task_ignore_result=True,
        result_backend=None,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        # A task runs longer than Redis's default 1 h redelivery window; a redelivered duplicate
        # would be dropped by the claim anyway, but needlessly wakes a worker.
        broker_transport_options={"visibility_timeout": 12 * 3600},
    )
    return app


app = make_celery(get_settings().BROKER_URL)


def _run(job_id: str, hostname: str | None) -> str | None:
    res = resources.for_worker(lambda: CeleryDispatcher(app))
    return attempt.execute(job_id, res, BODIES, worker=hostname)


# One task name per job kind so `celery inspect` and logs say what runs; all share one body runner.
def _register(kind: str):
    @app.task(name=f"recmerge.{kind}", bind=True)
    def task(self, job_id: str):
        return _run(job_id, f"{self.request.hostname}:{kind}")

    return task


TASKS = {kind: _register(kind) for kind in BODIES}


class CeleryDispatcher:
    def __init__(self, celery: Celery):
        self.celery = celery
        self._redis = None

    def send(self, job_id: str, kind: str, message_id: str) -> None:
        # By name through this dispatcher's own app: its broker comes from the Settings it was made with.
        self.celery.send_task(TASKS[kind].name, args=[job_id], task_id=message_id, queue=QUEUE)

    def _client(self):
        """The broker's Redis, or None when the broker is not Redis."""
        url = self.celery.conf.broker_url or ""
        if not url.startswith(("redis://", "rediss://")):
            return None
        if self._redis is None:
            import redis

            self._redis = redis.Redis.from_url(url, socket_timeout=5)
        return self._redis

    def pending(self, message_id: str) -> bool | None:
        """Is the message in the Redis queue or held unacknowledged by a worker? Kombu keeps the queue
        as a list named after it and delivered-but-unacked messages in the `unacked` hash."""
        import redis

        try:
            r = self._client()
            if r is None:
                return None
            needle = message_id.encode()
            lists = [QUEUE] + [f"{QUEUE}\x06\x16{p}" for p in (1, 2, 3, 4, 5, 6, 7, 8, 9)]
            for name in lists:
                if any(needle in m for m in r.lrange(name, 0, -1)):
                    return True
            return any(needle in m for m in r.hvals("unacked"))
        except redis.RedisError:
            return None  # the broker is down: nothing can be sent anyway

    def held(self) -> list[tuple[str, str, str, float | None]]:
        """(delivery tag, message id, job id, delivered at: epoch seconds) of every message delivered and not
        acknowledged. Kombu's `unacked` hash maps a delivery tag to [message, exchange, routing key] and the
        `unacked_index` zset scores it by delivery time; the message's body is our task's [args, kwargs,
        embed], base64-encoded, args = [job_id]."""
        import redis

        try:
            r = self._client()
            if r is None:
                return []
            entries = r.hgetall("unacked")
            when = dict(r.zrange("unacked_index", 0, -1, withscores=True))
        except redis.RedisError:
            return []
        out = []
        for tag, raw in entries.items():
            try:
                message = json.loads(raw)[0]
                body = message["body"]
                if message.get("properties", {}).get("body_encoding") == "base64":
                    body = base64.b64decode(body)
                out.append((tag.decode(), message["headers"]["id"], json.loads(body)[0][0], when.get(tag)))
            except (ValueError, KeyError, IndexError, TypeError):
                continue  # not one of ours: leave it alone
        return out

    def forget(self, tags: list[str]) -> None:
        """Drop deliveries from the unacked set (and its index) as an ack would. A worker that still holds
        one acks it later without harm; one that was killed never will, and kombu would otherwise deliver
        the message again only after the visibility timeout."""
        if not tags:
            return
        import redis

        try:
            r = self._client()
            if r is not None:
                r.pipeline().zrem("unacked_index", *tags).hdel("unacked", *tags).execute()
        except redis.RedisError:
            pass  # the next sweep tries again
