"""One attempt at one job: the frame every task body runs in, under Celery or the in-process runner.

    claim the row -> heartbeat thread -> body(attempt) -> commit its record + `succeeded` together
                                      -> or record the error (RecmergeError text verbatim)

The body does the work in a private scratch directory and returns a `record(session) -> result`
function. `record` runs in the same transaction that marks the job succeeded, and only while the
attempt still owns the job, so a result is registered once or not at all; artifacts reach the store
before that (content-addressed, atomic), so a row never names a missing or partial file.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session

from core import jobs
from core.settings import Settings
from models.errors import RecmergeError
from workers.public_errors import public_error
from workers.resources import Resources

log = logging.getLogger("recmerge.jobs")

Record = Callable[[Session], dict]
MAX_WRITES_PER_S = 2.0


@dataclass
class Attempt:
    claim: jobs.Claim
    res: Resources
    workdir: Path
    stopped: threading.Event = field(default_factory=threading.Event)  # the lease was lost
    interrupt: threading.Event | None = None  # the process is shutting down
    _stage: str | None = None
    _fraction: float = 0.0
    _dirty: bool = False

    @property
    def payload(self) -> dict:
        return self.claim.payload

    @property
    def settings(self) -> Settings:
        return self.res.settings

    def progress(self, stage: str, fraction: float) -> None:
        """The library's progress callback: cheap (memory only); the heartbeat thread writes it out.
        Also the place where a cancelled or re-queued attempt stops, between two steps of work."""
        self._stage, self._fraction, self._dirty = stage, fraction, True
        self.check()

    def check(self) -> None:
        if self.stopped.is_set() or (self.interrupt is not None and self.interrupt.is_set()):
            raise jobs.JobStopped(self.claim.id)

    def scaled(self, lo: float, hi: float, prefix: str = "") -> Callable[[str, float], None]:
        """A progress callback for one step of several: maps its 0..1 onto lo..hi of the job."""
        return lambda stage, f: self.progress(prefix + stage, lo + (hi - lo) * f)


class Heartbeat(threading.Thread):
    """Writes heartbeat + latest progress: at most MAX_WRITES_PER_S, and at least every
    HEARTBEAT_TIMEOUT_S / 4 even while the library is silent (one long step is not a dead worker)."""

    def __init__(self, attempt: Attempt):
        super().__init__(name=f"heartbeat-{attempt.claim.id[:8]}", daemon=True)
        self.a = attempt
        self.done = threading.Event()
        self.every = max(1.0 / MAX_WRITES_PER_S, attempt.settings.HEARTBEAT_TIMEOUT_S / 4)

    def run(self):
        last = time.monotonic()
        while not self.done.wait(1.0 / MAX_WRITES_PER_S):
            if not (self.a._dirty or time.monotonic() - last >= self.every):
                continue
            self.a._dirty = False
            try:
                with self.a.res.session() as s, s.begin():
                    owned = jobs.beat(s, self.a.claim, self.a._stage, self.a._fraction)
            except Exception as e:  # a database hiccup must not kill the work; the next beat retries
                log.warning("job %s: heartbeat failed: %s", self.a.claim.id, e)
                continue
            last = time.monotonic()
            if not owned:
                self.a.stopped.set()
                return


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.current_thread().name}"


def execute(job_id: str, res: Resources, bodies: dict[str, Callable[[Attempt], Record]],
            worker: str | None = None, interrupt: threading.Event | None = None) -> str | None:
    """Run one attempt of job_id if it is queued. Returns the status it ended in (None: not ours)."""
    with res.session() as s, s.begin():
        claim = jobs.claim(s, job_id, worker or worker_name())
    if claim is None:
        log.info("job %s: not queued (done, cancelled or running elsewhere); message dropped", job_id)
        return None
    # One scratch directory per attempt: a killed attempt's leftovers never mix with the next one's.
    workdir = res.settings.tmp_dir / "jobs" / f"{claim.id}.{claim.attempt}"
    for old in workdir.parent.glob(f"{claim.id}.*"):
        shutil.rmtree(old, ignore_errors=True)
    workdir.mkdir(parents=True)
    attempt = Attempt(claim, res, workdir, interrupt=interrupt)
    beat = Heartbeat(attempt)
    beat.start()
    status: str | None
    try:
        record = bodies[claim.kind](attempt)
        attempt.check()
        # Records name store files only; the scratch goes before the row turns terminal, so whoever sees
        # the job done (a client, a test, the next attempt's sweep) never finds its leftovers.
        shutil.rmtree(workdir, ignore_errors=True)
        with res.session() as s, s.begin():
            jobs.succeed(s, claim, record(s))
        status = "succeeded"
    except jobs.JobStopped:
        status = None
        shutil.rmtree(workdir, ignore_errors=True)
        if interrupt is not None and interrupt.is_set() and not attempt.stopped.is_set():
            # Shutting down, not cancelled: hand the job back so the next process starts it at once.
            with res.session() as s, s.begin():
                jobs.give_back(s, claim)
            log.info("job %s attempt %d interrupted by shutdown; re-queued", job_id, claim.attempt)
        else:
            log.info("job %s attempt %d stopped: cancelled or taken over; nothing recorded", job_id, claim.attempt)
    except Exception as e:
        # A RecmergeError is the user's to fix: retrying cannot help. Anything else may be transient.
        user_error = isinstance(e, RecmergeError)
        text = str(e) if user_error else f"{type(e).__name__}: {e}"
        if not user_error:
            log.exception("job %s attempt %d crashed", job_id, claim.attempt)
        # The log keeps the paths; the job row, which clients read, names inputs instead.
        text = public_error(text, [*res.labels.items(), (str(workdir), "the job's scratch")], res.server_roots())
        shutil.rmtree(workdir, ignore_errors=True)
        with res.session() as s, s.begin():
            status = jobs.fail(s, claim, text, retry=not user_error, max_attempts=res.settings.MAX_ATTEMPTS)
    finally:
        beat.done.set()
        beat.join()
        shutil.rmtree(workdir, ignore_errors=True)  # again for what escaped the branches above (interrupts)
    if status == "queued":
        res.dispatch(job_id, claim.kind)
    if status in jobs.TERMINAL:
        parent = claim.payload.get("parent")
        if parent:
            res.release(parent)
    return status
