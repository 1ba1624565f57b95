"""Two Celery workers on one Redis broker and one PostgreSQL database share the Fishers of one merge job:
they compute them at the same time, and when one worker is SIGKILLed part-way through a Fisher the other
goes on, takes over the lost Fisher once its heartbeat is stale, and the merge finishes with every Fisher
computed once and right.

Which worker did what comes from the job rows: a claim writes the worker's Celery node name into
`jobs.worker`, and `started_at` / `finished_at` bound each attempt."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.e2e.flow import ok, upload_dataset, upload_untrained, wait_job
from tests.e2e.services import start_api, start_worker, store_is_clean, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.services]

INGREDIENTS = 4  # two rounds on two workers: each worker finishes one Fisher and starts a second
# Exact Fishers over 12,000 users (30 items) take a few seconds each on an idle 2-core machine: long enough
# to see two at once and to kill one mid-way (progress is written every 0.5 s), short enough for the test to
# take a minute or two. At 1,000 users an idle machine finished a Fisher in 0.3-0.7 s, at times
# between two progress writes, so no row ever showed one part-way.
USERS = 12000
FISHER = {"sampling": "exact", "max_users": USERS}  # the merge default would cap them at 4,000 users


class Rows:
    def __init__(self, database_url: str):
        from sqlalchemy import create_engine

        self.engine = create_engine(database_url)

    def jobs(self, ids: list[str]) -> list:
        from sqlalchemy import bindparam, text

        q = text("SELECT id, kind, status, worker, attempts, fraction, payload, started_at, finished_at "
                 "FROM jobs WHERE id IN :ids").bindparams(bindparam("ids", expanding=True))
        with self.engine.connect() as c:
            return list(c.execute(q, {"ids": ids}))

    def fishers(self) -> list:
        from sqlalchemy import text

        with self.engine.connect() as c:
            return list(c.execute(text("SELECT cache_key, checkpoint_sha256, sha256 FROM fishers")))


def _node(row) -> int | None:
    """Which of the test's workers (1 or 2) the row names: start_worker calls them w<n>-<hex>@host."""
    if not row.worker:
        return None
    return int(row.worker.split("@")[0].split("-")[0].removeprefix("w"))


def _overlap(a, b) -> bool:
    return a.started_at < b.finished_at and b.started_at < a.finished_at


def test_two_workers_share_one_merges_fishers_and_one_survives_the_others_kill(services, tmp_path):
    env, _ = services
    api, client = start_api(env, tmp_path)
    workers = {n: start_worker(env, tmp_path, n) for n in (1, 2)}
    db = Rows(env["RECMERGE_DATABASE_URL"])
    try:
        dataset_id, local = upload_dataset(client, tmp_path, n_users=USERS)
        model_ids = [upload_untrained(client, local, tmp_path, dataset_id, f"m{i}", seed=i)
                     for i in range(INGREDIENTS)]
        job = ok(client.post("/merge-jobs", json={"method": "fisher", "model_ids": model_ids, "evaluate": False,
                                                  "fisher": FISHER}), 202)
        fishers = [c["id"] for c in job["children"]]
        assert [c["kind"] for c in job["children"]] == ["fisher"] * INGREDIENTS

        def running_on_both():
            return {_node(r) for r in db.jobs(fishers) if r.status == "running"} == {1, 2}

        wait_for(running_on_both, 120, "two Fishers of the job running at once, one on each worker")

        def a_victim():
            """(worker, job) once a worker has finished a Fisher and is part-way through its next one."""
            rows = db.jobs(fishers)
            for n in (1, 2):
                mine = [r for r in rows if _node(r) == n]
                busy = [r for r in mine if r.status == "running" and 0.05 < r.fraction < 0.9]
                if busy and any(r.status == "succeeded" for r in mine):
                    return n, busy[0].id
            return None

        victim, lost = wait_for(a_victim, 180, "a worker part-way through its second Fisher")
        survivor = 3 - victim
        going = [r.id for r in db.jobs(fishers) if _node(r) == survivor and r.status == "running"]
        workers[victim].kill()  # SIGKILL to the worker and its pool process: no ack, no cleanup
        killed_at = datetime.now(UTC)
        assert next(r for r in db.jobs([lost]) if r.id == lost).status == "running"  # nobody knows yet

        done = wait_job(client, f"/merge-jobs/{job['id']}", timeout=240)
        assert done["status"] == "succeeded", (done["error"], done["children"])
        assert workers[survivor].alive()

        rows = {r.id: r for r in db.jobs([*fishers, job["id"]])}
        kids = [rows[i] for i in fishers]
        assert all(r.status == "succeeded" for r in kids), [(r.id, r.status) for r in kids]
        # The lost Fisher was taken over by the survivor in a second attempt; no other Fisher ran twice.
        assert rows[lost].attempts == 2 and _node(rows[lost]) == survivor
        assert all(r.attempts == 1 for r in kids if r.id != lost)
        by_victim = [r for r in kids if _node(r) == victim]
        by_survivor = [r for r in kids if _node(r) == survivor]
        assert by_victim and len(by_victim) + len(by_survivor) == INGREDIENTS
        # In parallel: a Fisher the victim finished overlapped in time one the survivor computed.
        assert any(_overlap(a, b) for a in by_victim for b in by_survivor), [
            (_node(r), r.started_at, r.finished_at) for r in kids]
        # The survivor went on: what it was computing at the kill finished in that same attempt, after it.
        assert all(rows[i].attempts == 1 and rows[i].finished_at > killed_at for i in going)
        assert rows[lost].finished_at > killed_at
        assert _node(rows[job["id"]]) == survivor and rows[job["id"]].attempts == 1

        # One Fisher per ingredient in the cache, each file whole in the store, nothing left in scratch.
        cached = db.fishers()
        uploaded = {m["id"]: m["sha256"] for m in ok(client.get("/models", params={"kind": "recipe"}))}
        assert sorted(f.checkpoint_sha256 for f in cached) == sorted(uploaded[m] for m in model_ids)
        data_dir = Path(env["RECMERGE_DATA_DIR"])
        stored = store_is_clean(data_dir)
        assert all(f.sha256 in stored for f in cached)
        assert list((data_dir / "tmp" / "jobs").glob("*")) == []
        merged = ok(client.get("/models", params={"kind": "merged"}))
        assert [m["id"] for m in merged] == [done["result_model_id"]]
        assert merged[0]["merge"]["method"] == "fisher" and merged[0]["source_job_id"] == job["id"]
        assert merged[0]["merge"]["ingredients"] == [uploaded[m] for m in model_ids]

        # The Fisher computed again after the kill is the Fisher of its model, as estimated here.
        model_id = rows[lost].payload["model_id"]
        sha = next(f.sha256 for f in cached if f.checkpoint_sha256 == uploaded[model_id])
        _same_fisher(tmp_path / f"m{model_ids.index(model_id)}.safetensors", local, rows[lost].payload["settings"],
                     next((data_dir / "store").rglob(sha)), tmp_path / "reference.fisher.safetensors")
    except BaseException:
        print("--- api ---\n" + api.tail(), *(f"\n--- {w.name} ---\n" + w.tail() for w in workers.values()))
        raise
    finally:
        db.engine.dispose()
        client.close()
        api.stop()
        for w in workers.values():
            w.stop()


def _same_fisher(checkpoint: Path, local, settings: dict, served: Path, reference: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from merging.fisher import FisherSettings, estimate_fisher

    estimate_fisher(checkpoint, local, FisherSettings(**settings), out=reference)
    got, expected = load_file(served), load_file(reference)
    assert sorted(got) == sorted(expected)
    for name, t in expected.items():
        torch.testing.assert_close(got[name], t, rtol=1e-4, atol=1e-10, msg=name)
