"""Job state transitions on a real (SQLite) database: leases, exactly-once results, fan-in."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from core import jobs
from core.db_models import Dataset, Job, Model


@pytest.fixture
def s(bg):
    with bg.res.session() as session:
        yield session


def _job(s, kind="train", **kw) -> str:
    with s.begin():
        return jobs.create(s, kind, {"x": 1}, **kw).id


def test_claim_is_exclusive_and_counts_attempts(s):
    jid = _job(s)
    with s.begin():
        first = jobs.claim(s, jid, "w1")
        second = jobs.claim(s, jid, "w2")
    assert first is not None and first.attempt == 1 and first.payload == {"x": 1}
    assert second is None  # a redelivered message finds the job running and does nothing
    assert s.get(Job, jid, populate_existing=True).worker == "w1"


def test_lost_lease_cannot_beat_or_succeed(s):
    jid = _job(s)
    with s.begin():
        old = jobs.claim(s, jid, "w1")
        # The sweeper decided w1 is dead and someone else took over.
        s.execute(update(Job).where(Job.id == jid).values(status="queued"))
        new = jobs.claim(s, jid, "w2")
    assert new.attempt == 2
    with s.begin():
        assert jobs.beat(s, old, "train", 0.5) is False
        assert jobs.beat(s, new, "train", 0.5) is True
    with pytest.raises(jobs.JobStopped), s.begin():
        jobs.succeed(s, old, {"model_id": "nope"})
    with s.begin():
        jobs.succeed(s, new, {"model_id": "m"})
    row = s.get(Job, jid, populate_existing=True)
    assert (row.status, row.result, row.fraction) == ("succeeded", {"model_id": "m"}, 1.0)


def test_fail_retries_until_max_attempts_then_keeps_the_error(s):
    jid = _job(s)
    for attempt, expect in ((1, "queued"), (2, "failed")):
        with s.begin():
            c = jobs.claim(s, jid, "w")
            assert c.attempt == attempt
            assert jobs.fail(s, c, f"boom {attempt}", retry=True, max_attempts=2) == expect
    row = s.get(Job, jid, populate_existing=True)
    assert (row.status, row.error) == ("failed", "boom 2")


def test_user_error_fails_at_once(s):
    jid = _job(s)
    with s.begin():
        c = jobs.claim(s, jid, "w")
        assert jobs.fail(s, c, "dataset x: no such dataset", retry=False, max_attempts=3) == "failed"


def test_requeue_stale_only_touches_silent_jobs(s):
    dead, alive = _job(s), _job(s)
    with s.begin():
        jobs.claim(s, dead, "w1")
        jobs.claim(s, alive, "w2")
        s.execute(update(Job).where(Job.id == dead).values(heartbeat_at=jobs.now() - timedelta(seconds=60),
                                                             error="CUDA OOM"))
    with s.begin():
        requeued, failed = jobs.requeue_stale(s, timeout_s=10, max_attempts=3)
    assert (requeued, failed) == ([dead], [])
    assert s.get(Job, alive, populate_existing=True).status == "running"
    row = s.get(Job, dead)
    assert (row.status, row.worker, row.error) == ("queued", None, "CUDA OOM")


def test_requeue_stale_gives_up_with_the_last_error(s):
    jid = _job(s)
    with s.begin():
        jobs.claim(s, jid, "w1")
        s.execute(update(Job).where(Job.id == jid).values(heartbeat_at=jobs.now() - timedelta(seconds=60),
                                                            error="killed by OOM"))
        requeued, failed = jobs.requeue_stale(s, timeout_s=10, max_attempts=1)
    assert (requeued, failed) == ([], [jid])
    err = s.get(Job, jid, populate_existing=True).error
    assert err.startswith("gave up after 1 attempts: worker w1 stopped sending heartbeats") and "killed by OOM" in err


def test_parent_waits_for_children_and_is_released_once(s):
    a, b = _job(s, "fisher"), _job(s, "fisher")
    parent = _job(s, "merge", children=[a, b])
    with s.begin():
        assert jobs.claim(s, parent, "w") is None  # waiting parents cannot be claimed
        ca = jobs.claim(s, a, "w")
        jobs.succeed(s, ca, {})
        assert jobs.release(s, parent) is False  # b still queued
        cb = jobs.claim(s, b, "w")
        jobs.succeed(s, cb, {})
        assert jobs.release(s, parent) is True
        assert jobs.release(s, parent) is False  # a second releaser does not dispatch again
        assert jobs.claim(s, parent, "w") is not None


def test_failed_child_fails_the_parent_with_its_error(s):
    a = _job(s, "fisher")
    parent = _job(s, "merge", children=[a])
    with s.begin():
        jobs.fail(s, jobs.claim(s, a, "w"), "model m: its file is missing from the store", retry=False,
                  max_attempts=3)
        assert jobs.release(s, parent) is False
    row = s.get(Job, parent, populate_existing=True)
    assert row.status == "failed"
    assert row.error == f"fisher job {a} failed: model m: its file is missing from the store"


def test_cancel_cascades_to_unfinished_children_only(s):
    a, b = _job(s, "fisher"), _job(s, "fisher")
    parent = _job(s, "merge", children=[a, b])
    with s.begin():
        jobs.succeed(s, jobs.claim(s, a, "w"), {})
        jobs.claim(s, b, "w")
        cancelled = jobs.cancel(s, s.get(Job, parent))
    assert sorted(cancelled) == sorted([parent, b])
    assert s.get(Job, a, populate_existing=True).status == "succeeded"


def test_register_model_once_per_bytes(s):
    with s.begin():
        s.add(Dataset(id="d", name="d", fingerprint="f" * 64, source="x", params={}, n_users=1, n_items=1,
                      n_interactions=1))
    j1, j2 = _job(s), _job(s)
    fields = dict(kind="recipe", name="m", dataset_id="d", sha256="a" * 64, size=1, backbone={}, recipe={},
                  merge=None, metrics=None)
    with s.begin():
        m1 = jobs.register_model(s, source_job_id=j1, **fields)
    with s.begin():
        m2 = jobs.register_model(s, source_job_id=j2, **fields)
    assert m1.id == m2.id
    with s.begin():  # the same job again, other bytes (a nondeterministic re-run): still its first row
        m3 = jobs.register_model(s, source_job_id=j1, **{**fields, "sha256": "b" * 64})
    assert m3.id == m1.id
    assert s.scalar(select(func.count()).select_from(Model)) == 1
