"""Job state transitions. The `jobs` row is the truth; Celery messages and runner threads only say
"look at job X now".

    queued ──claim──► running ──succeed──► succeeded
       ▲                 │ ├──fail──────► failed
       └─requeue/retry───┘ └──cancel────► cancelled   (cancel also from queued)

Every transition is one conditional UPDATE, so two workers (a redelivered message, a re-queued job)
can never both own a job: `claim` only moves a queued row, and an attempt may only write to its row
while `attempts` still holds its own number (the lease). An attempt that lost its lease (cancelled,
or re-queued after its heartbeat went stale) can therefore neither report progress nor register a
result: whatever it computed is discarded, and the one attempt that commits decides the result.

Jobs can wait on others (a merge on its Fishers): the parent is created queued with stage `waiting`
and its children listed in the payload; it is dispatched when the last child ends (see `ready`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db_models import Job, Model

KINDS = ("prepare", "train", "fisher", "merge", "evaluate")
TERMINAL = ("succeeded", "failed", "cancelled")
WAITING = "waiting"  # stage of a queued parent whose children are not all finished


class JobStopped(Exception):
    """The attempt no longer owns its job (cancelled, or re-queued elsewhere): stop, record nothing."""


def _update(session: Session, stmt):
    # No in-Python evaluation of the WHERE clause against loaded objects: SQLite hands back naive
    # timestamps that Python cannot compare with aware ones. Callers re-read rows they care about.
    return session.execute(stmt, execution_options={"synchronize_session": False})


def now() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class Claim:
    """What an attempt knows about its job: a snapshot taken when it became the owner."""

    id: str
    kind: str
    payload: dict
    attempt: int


def create(session: Session, kind: str, payload: dict, *, job_id: str | None = None,
           children: list[str] | None = None, idempotency_key: str | None = None) -> Job:
    if kind not in KINDS:
        raise ValueError(f"unknown job kind {kind!r}")
    payload = dict(payload)
    if children:
        payload["children"] = list(children)
    job = Job(id=job_id or new_id(), kind=kind, status="queued", payload=payload, fraction=0.0, attempts=0,
              stage=WAITING if children else "queued", idempotency_key=idempotency_key, created_at=now(),
              heartbeat_at=now())
    session.add(job)
    session.flush()
    return job


def mark_sent(session: Session, job_id: str, message_id: str) -> None:
    """Remember which broker message stands for the job; the sweeper asks the broker about it."""
    _update(session, update(Job).where(Job.id == job_id, Job.status == "queued")
                    .values(celery_id=message_id, heartbeat_at=now(), stage="queued"))


def claim(session: Session, job_id: str, worker: str) -> Claim | None:
    """queued -> running, for exactly one caller. None when the job is not queued (any more)."""
    t = now()
    done = session.execute(
        update(Job).where(Job.id == job_id, Job.status == "queued", Job.stage != WAITING)
        .values(status="running", attempts=Job.attempts + 1, worker=worker, started_at=t, heartbeat_at=t,
                stage="starting", fraction=0.0)
    ).rowcount
    if not done:
        return None
    job = session.get(Job, job_id, populate_existing=True)
    return Claim(job.id, job.kind, dict(job.payload or {}), job.attempts)


def _owned(c: Claim):
    return (Job.id == c.id, Job.status == "running", Job.attempts == c.attempt)


def beat(session: Session, c: Claim, stage: str | None, fraction: float | None) -> bool:
    """Heartbeat plus progress. False when the attempt lost its lease."""
    values = {"heartbeat_at": now()}
    if stage is not None:
        values.update(stage=stage[:100], fraction=float(min(max(fraction or 0.0, 0.0), 1.0)))
    return bool(_update(session, update(Job).where(*_owned(c)).values(**values)).rowcount)


def succeed(session: Session, c: Claim, result: dict) -> None:
    """Raises JobStopped (roll the transaction back: nothing registered) when the lease was lost."""
    done = _update(session, update(Job).where(*_owned(c)).values(
        status="succeeded", result=result, stage="done", fraction=1.0, error=None, finished_at=now())).rowcount
    if not done:
        raise JobStopped(c.id)


def fail(session: Session, c: Claim, error: str, *, retry: bool, max_attempts: int) -> str | None:
    """Record an attempt's error. A retryable error re-queues the job until max_attempts; returns the
    new status, or None when the attempt no longer owned the job."""
    again = retry and c.attempt < max_attempts
    values = {"error": error, "worker": None}
    if again:
        values.update(status="queued", stage="retrying", fraction=0.0, heartbeat_at=now())
    else:
        values.update(status="failed", finished_at=now())
    done = _update(session, update(Job).where(*_owned(c)).values(**values)).rowcount
    return ("queued" if again else "failed") if done else None


def give_back(session: Session, c: Claim) -> None:
    """running -> queued without an error: the process is stopping, the work was not at fault."""
    _update(session, update(Job).where(*_owned(c)).values(status="queued", stage="interrupted", worker=None,
                                                         fraction=0.0, heartbeat_at=now()))


def cancel(session: Session, job: Job) -> list[str]:
    """Cancel a job that has not ended, and its unfinished children. Returns the ids cancelled."""
    ids = [job.id, *((job.payload or {}).get("children") or [])]
    res = _update(session, update(Job).where(Job.id.in_(ids), Job.status.in_(("queued", "running")))
                          .values(status="cancelled", finished_at=now(), stage="cancelled")
                          .returning(Job.id))
    return [r[0] for r in res]


def requeue_stale(session: Session, timeout_s: float, max_attempts: int) -> tuple[list[str], list[str]]:
    """Running jobs whose heartbeat is older than timeout_s lost their worker: re-queue them, or fail
    them once they used max_attempts. Returns (re-queued ids, failed ids)."""
    cutoff = now() - timedelta(seconds=timeout_s)
    stale = session.scalars(select(Job).where(Job.status == "running", Job.heartbeat_at < cutoff)).all()
    requeued, failed = [], []
    for job in stale:
        lost = f"worker {job.worker} stopped sending heartbeats (attempt {job.attempts})"
        last = f"{lost}; last error: {job.error}" if job.error else lost
        if job.attempts >= max_attempts:
            values = {"status": "failed", "finished_at": now(), "error": f"gave up after {job.attempts} "
                      f"attempts: {last}"}
            bucket = failed
        else:
            values = {"status": "queued", "stage": "requeued", "fraction": 0.0, "worker": None,
                      "heartbeat_at": now(), "error": job.error}
            bucket = requeued
        # The same conditions again: a heartbeat that arrived since the SELECT wins over the sweeper.
        done = _update(session, update(Job).where(Job.id == job.id, Job.status == "running",
                                                 Job.attempts == job.attempts, Job.heartbeat_at < cutoff)
                               .values(**values)).rowcount
        if done:
            bucket.append(job.id)
    return requeued, failed


def children_state(session: Session, job: Job) -> tuple[bool, Job | None]:
    """(all children ended, the first child that failed or was cancelled)."""
    ids = (job.payload or {}).get("children") or []
    if not ids:
        return True, None
    kids = session.scalars(select(Job).where(Job.id.in_(ids))).all()
    bad = next((k for k in kids if k.status in ("failed", "cancelled")), None)
    return all(k.status in TERMINAL for k in kids) and len(kids) == len(ids), bad


def release(session: Session, parent_id: str) -> bool:
    """Called when a child ends. A waiting parent whose children all ended becomes runnable (True:
    dispatch it), or fails with its child's error. Conditional updates make this happen once."""
    parent = session.get(Job, parent_id, populate_existing=True)
    if parent is None or parent.status != "queued" or parent.stage != WAITING:
        return False
    ended, bad = children_state(session, parent)
    if not ended:
        return False
    if bad is not None:
        why = bad.error or bad.status
        _update(session, update(Job).where(Job.id == parent_id, Job.status == "queued", Job.stage == WAITING)
                        .values(status="failed", finished_at=now(), stage="failed",
                                error=f"{bad.kind} job {bad.id} {bad.status}: {why}"))
        return False
    return bool(_update(session, update(Job).where(Job.id == parent_id, Job.status == "queued",
                                                  Job.stage == WAITING)
                                .values(stage="ready", heartbeat_at=now())).rowcount)


def register_model(session: Session, **fields) -> Model:
    """Insert a model row once per job and per (kind, sha256): the same bytes from a second attempt or a
    second job resolve to the first row instead of a duplicate."""
    kind, sha, job_id = fields["kind"], fields["sha256"], fields.get("source_job_id")
    if job_id is not None:  # this job registered already (cannot happen while leases hold; cheap to check)
        found = session.scalar(select(Model).where(Model.source_job_id == job_id))
        if found is not None:
            return found
    found = session.scalar(select(Model).where(Model.kind == kind, Model.sha256 == sha))
    if found is not None:
        return found
    try:
        with session.begin_nested():
            row = Model(id=new_id(), created_at=now(), **fields)
            session.add(row)
        return row
    except IntegrityError:  # a concurrent job registered the same bytes first
        return session.scalar(select(Model).where(Model.kind == kind, Model.sha256 == sha))
