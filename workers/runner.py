"""Embedded mode: jobs run in the API process on a small thread pool — no Redis, no worker process.

The runner is a Dispatcher like Celery: it receives "run job X" and calls the same
`attempt.execute` a Celery worker calls, so both modes share every line of job logic. Its queue
lives in memory; if the process stops, the jobs table still says what was queued or running, and
the sweeper of the next process re-sends them (see `Background`).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from core.settings import Settings
from workers import attempt
from workers.resources import Resources
from workers.sweeper import Sweeper
from workers.tasks import BODIES

log = logging.getLogger("recmerge.jobs")


class Runner:
    def __init__(self, threads: int = 2):
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="recmerge-job")
        self.res: Resources | None = None
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self.interrupt = threading.Event()

    def send(self, job_id: str, kind: str, message_id: str) -> None:
        with self._lock:
            self._pending.add(message_id)
        self.pool.submit(self._run, job_id, message_id)

    def pending(self, message_id: str) -> bool:
        with self._lock:
            return message_id in self._pending

    def _run(self, job_id: str, message_id: str) -> None:
        try:
            attempt.execute(job_id, self.res, BODIES, interrupt=self.interrupt)
        except Exception:  # the job row already says what happened; keep the pool alive
            log.exception("job %s: runner error", job_id)
        finally:
            with self._lock:
                self._pending.discard(message_id)

    def shutdown(self, wait: bool = True) -> None:
        """Running attempts stop at their next progress call and hand their jobs back."""
        self.interrupt.set()
        self.pool.shutdown(wait=wait, cancel_futures=True)


class Background:
    """What the API process runs beside the HTTP server: the sweeper always, the runner when embedded.

    `res.dispatch(job_id, kind)` is how the API sends jobs in either mode."""

    def __init__(self, settings: Settings, threads: int = 2):
        if settings.embedded:
            self.runner: Runner | None = Runner(threads)
            dispatcher = self.runner
        else:
            from workers.celery_app import CeleryDispatcher, make_celery

            self.runner = None
            dispatcher = CeleryDispatcher(make_celery(settings.BROKER_URL))
        self.res = Resources(settings, dispatcher)
        if self.runner is not None:
            self.runner.res = self.res
        self.sweeper = Sweeper(self.res)

    def start(self) -> Background:
        self.sweeper.start()
        return self

    def stop(self) -> None:
        self.sweeper.stop()
        if self.runner is not None:
            self.runner.shutdown()
        self.res.engine.dispose()


def start_background(settings: Settings) -> Background:
    return Background(settings).start()
