"""Serving: concurrent requests share one forward pass (and get what they would alone), the model
cache is an LRU, and a lone request does not wait for company."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np

from app.lru import LRUCache
from app.serving import MicroBatcher
from models.checkpoint import load_model
from models.recommend import recommend_history
from tests.app.conftest import checkpoint_bytes


def _metric(svc, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = svc.client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise KeyError(name)


def test_concurrent_requests_are_batched_and_equal_unbatched(make_service, tmp_path):
    svc = make_service(BATCH_WAIT_MS=200.0, BATCH_MAX=32)
    d = svc.upload_dataset()
    m = svc.upload_recipe(checkpoint_bytes(tmp_path, d["fingerprint"], d["n_items"]), d["id"]).json()
    users = [f"u{i}" for i in range(1, 25)]

    async def burst():
        transport = httpx.ASGITransport(app=svc.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            return await asyncio.gather(*(client.get(f"/recommend/{u}", params={"model": m["id"], "k": 5})
                                          for u in users))

    answers = asyncio.run(burst())
    assert all(r.status_code == 200 for r in answers)
    batches = _metric(svc, "recmerge_recommend_batch_size_count")
    assert batches < len(users)  # fewer forward passes than requests
    assert _metric(svc, "recmerge_recommend_batch_size_sum") == len(users)

    # Each answer equals the unbatched library call for that user alone.
    model, _ = load_model(svc.app.state.store.path_for(m["sha256"]))
    ds = svc.app.state.recommender.dataset(d["fingerprint"])
    for u, r in zip(users, answers):
        alone = recommend_history(model, ds.sequence(ds.user_index(u)), 5, ds.n_items)
        got = r.json()["items"]
        assert [x["item"] for x in got] == [ds.item_ids[i - 1] for i, _ in alone]
        np.testing.assert_allclose([x["score"] for x in got], [s for _, s in alone], rtol=1e-4, atol=1e-5)


def test_batch_with_two_models_runs_each_on_its_own(make_service, tmp_path):
    svc = make_service(BATCH_WAIT_MS=200.0)
    d = svc.upload_dataset()
    ids = [svc.upload_recipe(checkpoint_bytes(tmp_path, d["fingerprint"], d["n_items"], seed=s), d["id"],
                             name=f"m{s}").json()["id"] for s in (1, 2)]
    alone = {i: svc.client.get("/recommend/u5", params={"model": i}).json() for i in ids}

    async def burst():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=svc.app), base_url="http://api") as c:
            return await asyncio.gather(*(c.get("/recommend/u5", params={"model": i}) for i in ids * 3))

    for r, i in zip(asyncio.run(burst()), ids * 3):
        got, want = r.json()["items"], alone[i]["items"]
        assert r.json()["model_id"] == i and [x["item"] for x in got] == [x["item"] for x in want]
        np.testing.assert_allclose([x["score"] for x in got], [x["score"] for x in want], rtol=1e-4, atol=1e-5)
    assert ids[0] != ids[1] and alone[ids[0]]["items"] != alone[ids[1]]["items"]


def test_lone_request_does_not_wait():
    def run(batch):
        return [x * 2 for x in batch]

    batcher = MicroBatcher(run, max_batch=32, max_wait_s=5.0)

    async def one():
        with batcher.reserve():
            t = time.perf_counter()
            assert await batcher.submit(21) == 42
            return time.perf_counter() - t

    assert asyncio.run(one()) < 1.0  # not the 5 s wait: nobody else was in flight
    batcher.close()


def test_batcher_error_reaches_every_caller_and_batcher_survives():
    calls = []

    def run(batch):
        calls.append(list(batch))
        if -1 in batch:
            raise RuntimeError("boom")
        return [ValueError("odd") if x % 2 else x for x in batch]

    batcher = MicroBatcher(run, max_batch=4, max_wait_s=0.05)

    async def go():
        async def call(x):
            with batcher.reserve():
                try:
                    return await batcher.submit(x)
                except Exception as e:
                    return type(e).__name__
        first = await asyncio.gather(call(-1), call(2))
        second = await asyncio.gather(*(call(x) for x in (1, 2, 3, 4, 6)))
        return first, second

    first, second = asyncio.run(go())
    assert first == ["RuntimeError", "RuntimeError"]
    assert second == ["ValueError", 2, "ValueError", 4, 6]
    assert max(len(c) for c in calls) == 4  # max_batch holds
    batcher.close()


def test_model_cache_is_lru(make_service, tmp_path):
    svc = make_service(MODEL_CACHE_SIZE=2)
    d = svc.upload_dataset()
    a, b, c = (svc.upload_recipe(checkpoint_bytes(tmp_path, d["fingerprint"], d["n_items"], seed=s), d["id"],
                                 name=f"m{s}").json()["id"] for s in (1, 2, 3))
    for model in (a, b, a, c, a, b):  # c evicts b (a was used more recently), then b evicts c
        assert svc.client.get("/recommend/u1", params={"model": model}).status_code == 200
    cache = svc.app.state.recommender.models
    assert a in cache and b in cache and c not in cache
    assert _metric(svc, "recmerge_model_cache_total") is not None
    text = svc.client.get("/metrics").text
    assert 'recmerge_model_cache_total{result="miss"} 4.0' in text  # a, b, c, b again
    assert 'recmerge_model_cache_total{result="hit"} 2.0' in text  # a twice


def test_lru_cache_loads_once():
    loads = []
    cache = LRUCache(2, lambda r: None)
    for key in ("x", "x", "y", "z", "x"):
        cache.get(key, lambda k: loads.append(k) or k.upper())
    assert loads == ["x", "y", "z", "x"]
    assert cache.peek("z") == "Z" and cache.peek("y") is None
