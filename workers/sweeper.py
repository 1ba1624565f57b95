"""The sweeper: finds jobs that nobody will finish and sends them again.

It runs as a thread in every API process (several API processes may sweep at once: every change it
makes is a conditional UPDATE, so two sweepers never re-queue a job twice). Each pass, every
SWEEP_INTERVAL_S:
- running, heartbeat older than HEARTBEAT_TIMEOUT_S: the worker died -> back to queued and sent
  again, or failed with the last error once MAX_ATTEMPTS attempts were used;
- queued and runnable, sent more than a grace period ago, and the broker no longer holds its
  message (Redis restarted, a send that failed): sent again. A broker that cannot tell gets the
  message again after HEARTBEAT_TIMEOUT_S; a duplicate is harmless (the claim drops it);
- queued and waiting for children that have all ended (the process that should have released it
  died in between): released;
- a delivery in the broker's unacked set whose job has ended or was sent again under a new message id
  (its worker was killed before it could ack), or whose job is still queued long after the delivery
  (its worker was killed before it could claim it): dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC

from sqlalchemy import select

from core import jobs
from core.db_models import Job
from workers.resources import Resources

log = logging.getLogger("recmerge.sweeper")


def sweep_once(res: Resources) -> dict[str, list[str]]:
    st = res.settings
    with res.session() as s, s.begin():
        requeued, failed = jobs.requeue_stale(s, st.HEARTBEAT_TIMEOUT_S, st.MAX_ATTEMPTS)
    report = {"requeued": requeued, "failed": failed, "resent": [], "released": []}
    for job_id in requeued:
        log.warning("job %s: worker lost, re-queued", job_id)
        _dispatch(res, job_id)
    for job_id in failed:
        log.warning("job %s: worker lost too often, failed", job_id)
        _release_parent(res, job_id)

    grace = max(2 * st.SWEEP_INTERVAL_S, 5.0)
    t = jobs.now()
    with res.session() as s:
        queued = s.scalars(select(Job).where(Job.status == "queued")).all()
    for job in queued:
        if job.stage == jobs.WAITING:
            with res.session() as s:
                ended, _ = jobs.children_state(s, job)
            if ended:
                res.release(job.id)
                report["released"].append(job.id)
            continue
        if job.id in requeued or job.heartbeat_at is None:
            continue
        age = (t - _aware(job.heartbeat_at)).total_seconds()
        if age < grace:
            continue
        there = res.dispatcher.pending(job.celery_id) if job.celery_id else False
        if there is False or (there is None and age > st.HEARTBEAT_TIMEOUT_S):
            log.warning("job %s: message lost (queued %.0f s), sent again", job.id, age)
            res.dispatch(job.id, job.kind)
            report["resent"].append(job.id)
    report["forgotten"] = _forget_stale_deliveries(res)
    return report


def _forget_stale_deliveries(res: Resources) -> list[str]:
    """A worker killed as a whole never acks: its message stays in the broker's unacked set until the
    visibility timeout (12 h) and is then delivered again for nothing. Once the job row says the message
    no longer matters — the job ended, or was sent again under another message id — it is dropped. So is
    the delivery of a job still queued HEARTBEAT_TIMEOUT_S after it was delivered: a live worker claims
    what it takes at once (one message per pool process, acks late), so its holder died between taking and
    claiming it; once dropped, the message counts as lost and the next pass sends it again (a duplicate
    would be harmless: the claim drops it). Returns the message ids dropped."""
    held = getattr(res.dispatcher, "held", None)
    if held is None:
        return []
    deliveries = held()
    if not deliveries:
        return []
    with res.session() as s:
        rows = {j.id: (j.status, j.celery_id)
                for j in s.scalars(select(Job).where(Job.id.in_({d[2] for d in deliveries})))}
    now = time.time()

    def stale(message_id: str, job_id: str, delivered: float | None) -> bool:
        if job_id not in rows:
            return False
        status, current = rows[job_id]
        if status in jobs.TERMINAL or current != message_id:
            return True
        return status == "queued" and delivered is not None and now - delivered > res.settings.HEARTBEAT_TIMEOUT_S

    dropped = [(tag, message_id) for tag, message_id, job_id, delivered in deliveries
               if stale(message_id, job_id, delivered)]
    if dropped:
        res.dispatcher.forget([tag for tag, _ in dropped])
        log.info("dropped %d unacknowledged deliveries of ended, re-sent or orphaned jobs", len(dropped))
    return [message_id for _, message_id in dropped]


def _aware(ts):
    # SQLite hands back naive datetimes for timezone-aware columns; they were written in UTC.
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def _dispatch(res: Resources, job_id: str) -> None:
    with res.session() as s:
        kind = s.get(Job, job_id).kind
    res.dispatch(job_id, kind)


def _release_parent(res: Resources, job_id: str) -> None:
    with res.session() as s:
        parent = (s.get(Job, job_id).payload or {}).get("parent")
    if parent:
        res.release(parent)


class Sweeper(threading.Thread):
    def __init__(self, res: Resources):
        super().__init__(name="recmerge-sweeper", daemon=True)
        self.res = res
        self.halt = threading.Event()

    def run(self):
        # The first pass runs at once: after a restart, queued work is sent again without waiting.
        while True:
            try:
                sweep_once(self.res)
            except Exception:  # a database outage must not end the sweeper
                log.exception("sweep failed; retrying in %.0f s", self.res.settings.SWEEP_INTERVAL_S)
            if self.halt.wait(self.res.settings.SWEEP_INTERVAL_S):
                return

    def stop(self) -> None:
        self.halt.set()

