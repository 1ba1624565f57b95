"""Real jobs through the in-process runner: prepare + train, user errors, cancellation, the sweeper."""

from __future__ import annotations

import json
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from core import jobs
from core.db_models import Dataset, Job, Model
from models.errors import RecmergeError
from models.recipes import recipe_options
from tests.conftest_services import s3_endpoint  # noqa: F401
from tests.synthetic import make_planted_dataset
from tests.workers.conftest import submit, wait
from workers.sweeper import sweep_once

TINY = {"hidden": 16, "layers": 1, "heads": 1, "inner": 32, "max_len": 20, "batch_size": 64, "epochs": 1}


@pytest.fixture
def dataset_id(bg, tmp_path):
    make_planted_dataset(tmp_path / "raw", n_users=120, n_items=30)
    sha = bg.res.store.put_file(tmp_path / "raw" / "planted.txt")
    jid = submit(bg.res, "prepare", {"source": f"upload:{sha}", "filename": "planted.txt", "fmt": "sasrec",
                                     "name": "planted"})
    job = wait(bg.res, jid)
    assert job.status == "succeeded", job.error
    return job.result["dataset_id"]


def _count(res, model) -> int:
    with res.session() as s:
        return s.scalar(select(func.count()).select_from(model))


def test_prepare_then_train_registers_one_model_with_its_file(bg, dataset_id):
    with bg.res.session() as s:
        ds = s.get(Dataset, dataset_id)
        assert (ds.n_users, ds.n_items, ds.name) == (120, 30, "planted")
    jid = submit(bg.res, "train", {"dataset_id": dataset_id, "name": "base", **TINY})
    job = wait(bg.res, jid)
    assert job.status == "succeeded", job.error
    assert (job.attempts, job.stage, job.fraction, job.error) == (1, "done", 1.0, None)
    with bg.res.session() as s:
        m = s.get(Model, job.result["model_id"])
    assert (m.kind, m.name, m.dataset_id, m.source_job_id) == ("recipe", "base", dataset_id, jid)
    assert m.backbone["hidden"] == 16 and m.recipe["name"] == "bert4rec"
    assert set(m.metrics) == {"valid", "test"} and 0.0 <= m.metrics["test"]["full"]["ndcg@10"] <= 1.0
    assert bg.res.store.exists(m.sha256) and bg.res.store.size(m.sha256) == m.size
    assert not list((bg.res.settings.tmp_dir / "jobs").iterdir())  # scratch space cleaned


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_job_runs_at_the_requested_precision(bg, dataset_id, precision):
    from models.checkpoint import read_metadata

    jid = submit(bg.res, "train", {"dataset_id": dataset_id, "precision": precision, **TINY})
    job = wait(bg.res, jid)
    assert job.status == "succeeded", job.error
    _, path = bg.res.model(job.result["model_id"])
    summary = json.loads(read_metadata(path).extra["train"])
    assert summary["config"]["precision"] == precision
    assert summary["precision"] == ("torch.bfloat16" if precision == "bf16" else "torch.float32")


def test_an_unknown_precision_is_refused_before_a_job_exists():
    from pydantic import ValidationError

    from core.specs import TrainSpec

    with pytest.raises(ValidationError, match="precision"):
        TrainSpec(dataset_id="d", precision="fp8")


def test_user_error_fails_once_with_the_library_message(bg, dataset_id):
    with pytest.raises(RecmergeError) as expected:
        recipe_options("bert4rec", {"bogus": 1})
    jid = submit(bg.res, "train", {"dataset_id": dataset_id, "options": {"bogus": 1}, **TINY})
    job = wait(bg.res, jid)
    assert (job.status, job.attempts, job.error) == ("failed", 1, str(expected.value))
    assert _count(bg.res, Model) == 0


def test_cancel_stops_a_running_job_and_registers_nothing(bg, dataset_id):
    jid = submit(bg.res, "train", {"dataset_id": dataset_id, **{**TINY, "epochs": 500, "patience": 0}})
    wait(bg.res, jid, until=("running",))
    deadline = time.monotonic() + 20
    while True:  # the library's progress reaches the row while the job runs
        with bg.res.session() as s:
            job = s.get(Job, jid)
        if job.stage == "train" and job.fraction > 0:
            break
        assert time.monotonic() < deadline, (job.stage, job.fraction)
        time.sleep(0.05)
    with bg.res.session() as s, s.begin():
        assert jobs.cancel(s, s.get(Job, jid)) == [jid]
    deadline = time.monotonic() + 20
    while bg.runner._pending and time.monotonic() < deadline:  # the attempt notices and returns
        time.sleep(0.05)
    assert not bg.runner._pending
    job = wait(bg.res, jid)
    assert job.status == "cancelled" and job.result is None
    assert _count(bg.res, Model) == 0
    assert not list((bg.res.settings.tmp_dir / "jobs").iterdir())


def _as_if_a_worker_died(res, jid):
    with res.session() as s, s.begin():
        assert jobs.claim(s, jid, "dead-worker") is not None
        s.execute(update(Job).where(Job.id == jid).values(heartbeat_at=jobs.now() - timedelta(seconds=30)),
                  execution_options={"synchronize_session": False})


def test_sweeper_requeues_the_job_of_a_dead_worker(bg, dataset_id):
    with bg.res.session() as s, s.begin():
        jid = jobs.create(s, "train", {"dataset_id": dataset_id, **TINY}).id
    _as_if_a_worker_died(bg.res, jid)
    report = sweep_once(bg.res)
    assert report["requeued"] == [jid]
    job = wait(bg.res, jid)
    assert (job.status, job.attempts) == ("succeeded", 2)
    assert _count(bg.res, Model) == 1


def test_sweeper_fails_after_max_attempts(bg, dataset_id):
    with bg.res.session() as s, s.begin():
        jid = jobs.create(s, "train", {"dataset_id": dataset_id, **TINY}).id
        # Earlier attempts already died; this is the last one allowed.
        s.execute(update(Job).where(Job.id == jid).values(attempts=bg.res.settings.MAX_ATTEMPTS - 1,
                                                          error="Killed"),
                  execution_options={"synchronize_session": False})
    _as_if_a_worker_died(bg.res, jid)
    report = sweep_once(bg.res)
    assert (report["requeued"], report["failed"]) == ([], [jid])
    job = wait(bg.res, jid)
    assert job.status == "failed"
    assert job.error == ("gave up after 2 attempts: worker dead-worker stopped sending heartbeats (attempt 2); "
                         "last error: Killed")
    assert _count(bg.res, Model) == 0


def test_sweeper_resends_a_lost_message(bg, dataset_id):
    with bg.res.session() as s, s.begin():
        jid = jobs.create(s, "train", {"dataset_id": dataset_id, **TINY}).id
        jobs.mark_sent(s, jid, "a-message-the-broker-lost")
        s.execute(update(Job).where(Job.id == jid).values(heartbeat_at=jobs.now() - timedelta(seconds=30)),
                  execution_options={"synchronize_session": False})
    assert sweep_once(bg.res)["resent"] == [jid]
    job = wait(bg.res, jid)
    assert (job.status, job.attempts) == ("succeeded", 1)


def test_shutdown_hands_the_running_job_back_and_the_next_process_finishes_it(bg, settings, dataset_id):
    from workers.runner import Background

    # max_minutes: the second attempt stops training after about a second and registers its model.
    jid = submit(bg.res, "train", {"dataset_id": dataset_id, **{**TINY, "epochs": 500, "patience": 0},
                                   "max_minutes": 0.02})
    wait(bg.res, jid, until=("running",))
    bg.runner.shutdown(wait=True)  # what the API's lifespan does on SIGTERM
    with bg.res.session() as s:
        job = s.get(Job, jid)
        assert (job.status, job.stage, job.attempts, job.worker) == ("queued", "interrupted", 1, None)
        s.execute(update(Job).where(Job.id == jid).values(heartbeat_at=jobs.now() - timedelta(seconds=30)),
                  execution_options={"synchronize_session": False})
        s.commit()
    assert _count(bg.res, Model) == 0

    nxt = Background(settings)  # the next process on the same database and store
    try:
        assert sweep_once(nxt.res)["resent"] == [jid]
        job = wait(nxt.res, jid)
        assert (job.status, job.attempts) == ("succeeded", 2), job.error
        assert _count(nxt.res, Model) == 1
    finally:
        nxt.stop()


def test_jobs_on_an_s3_store(tmp_path, s3_endpoint):  # noqa: F811
    """Workers on other machines share artifacts through S3: the same bodies read and write there."""
    from app.migrate import upgrade
    from core.settings import Settings
    from core.store import S3Store
    from workers.runner import Background

    settings = Settings(DATA_DIR=tmp_path / "svc", BROKER_URL=None, DATABASE_URL="",
                        STORE_URL="s3://recmerge-test/artifacts", S3_ENDPOINT_URL=s3_endpoint)
    upgrade(settings.DATABASE_URL)
    b = Background(settings)
    try:
        assert isinstance(b.res.store, S3Store)
        make_planted_dataset(tmp_path / "raw", n_users=120, n_items=30)
        sha = b.res.store.put_file(tmp_path / "raw" / "planted.txt")
        prep = wait(b.res, submit(b.res, "prepare", {"source": f"upload:{sha}", "filename": "planted.txt",
                                                      "fmt": "sasrec"}))
        assert prep.status == "succeeded", prep.error
        job = wait(b.res, submit(b.res, "train", {"dataset_id": prep.result["dataset_id"], **TINY}))
        assert job.status == "succeeded", job.error
        keys = [o["Key"] for o in b.res.store.s3.list_objects_v2(Bucket="recmerge-test")["Contents"]]
        assert f"artifacts/objects/{job.result['sha256']}" in keys
        assert f"artifacts/dirs/{prep.result['fingerprint']}/.complete" in keys
    finally:
        b.stop()


def _merge(res, spec: dict) -> Job:
    from app.services.jobs import submit_merge
    from core.specs import MergeSpec

    with res.session() as s:
        job, send = submit_merge(s, MergeSpec(**spec), store=res.store)
        s.commit()
    for job_id, kind in send:
        res.dispatch(job_id, kind)
    return job


def test_fisher_merge_fans_out_and_a_lost_fisher_file_is_computed_again(bg, dataset_id):
    from core.db_models import Fisher

    models = [wait(bg.res, submit(bg.res, "train", {"dataset_id": dataset_id, **TINY, "seed": i})).result["model_id"]
              for i in (1, 2)]
    spec = {"method": "fisher", "model_ids": models, "fisher": {"sampling": "topk", "n": 3}, "evaluate": False}
    first = _merge(bg.res, spec)
    assert len(first.payload["children"]) == 2
    done = wait(bg.res, first.id)
    assert done.status == "succeeded", done.error
    with bg.res.session() as s:
        fishers = s.scalars(select(Fisher)).all()
    assert len(fishers) == 2 and all(bg.res.store.exists(f.sha256) for f in fishers)

    bg.res.store.delete(fishers[0].sha256)  # an operator cleaned the store
    second = _merge(bg.res, spec)
    assert len(second.payload["children"]) == 1  # only the missing one is estimated again
    done = wait(bg.res, second.id)
    assert done.status == "succeeded", done.error
    # The Fisher estimated again is bit-identical, so the merge is too: the same model, not a second one.
    assert done.result["model_id"] == wait(bg.res, first.id).result["model_id"]
    with bg.res.session() as s:
        assert all(bg.res.store.exists(f.sha256) for f in s.scalars(select(Fisher)))



@pytest.mark.parametrize("ends", ["succeeded", "failed"])
def test_the_scratch_is_gone_before_the_job_is_seen_to_end(bg, ends, monkeypatch):
    from workers import attempt

    seen = {}
    real_fail = jobs.fail

    def fail(s, claim, text, **kw):  # the transaction that makes the failure visible
        seen["scratch_at_end"] = seen["workdir"].exists()
        return real_fail(s, claim, text, **kw)

    monkeypatch.setattr(jobs, "fail", fail)

    def body(a):
        (a.workdir / "part.bin").write_bytes(b"x" * 1000)
        seen["workdir"] = a.workdir
        if ends == "failed":
            raise RecmergeError("bad input")

        def record(s):  # runs in the transaction that marks the job succeeded
            seen["scratch_at_end"] = a.workdir.exists()
            return {}

        return record

    with bg.res.session() as s, s.begin():
        jid = jobs.create(s, "evaluate", {}).id
    assert attempt.execute(jid, bg.res, {"evaluate": body}) == ends
    assert seen["scratch_at_end"] is False and not seen["workdir"].exists()
