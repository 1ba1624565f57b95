"""The API's happy paths, checked against the library computing the same thing directly."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest

from models.checkpoint import load_model
from models.recommend import recommend_history
from tests.app.conftest import SHARED_DATA, checkpoint_bytes, interactions_csv


def test_dataset_upload_list_get_and_idempotent(svc):
    d = svc.upload_dataset()
    assert (d["n_users"], d["n_items"], d["source"]) == (40, 30, "upload:inter.csv")
    assert set(d) == {"id", "name", "fingerprint", "source", "n_users", "n_items", "n_interactions", "created_at"}
    assert svc.client.get(f"/datasets/{d['id']}").json() == d
    assert [x["id"] for x in svc.client.get("/datasets").json()] == [d["id"]]
    before = svc.snapshot()
    again = svc.client.post("/datasets", data={"name": "other"}, files={"file": ("x.csv", interactions_csv())})
    assert again.status_code == 200 and again.json()["id"] == d["id"]
    assert svc.snapshot() == before
    assert svc.app.state.store.has_dir(d["fingerprint"])


def test_builtin_ml100k(svc, tmp_path, monkeypatch):
    src = SHARED_DATA / "ml-100k"
    if not src.is_dir():
        pytest.skip(f"{src} not present")
    # The server fetches ml-100k into the user's cache; seed that cache so no network is needed.
    cache = tmp_path / "xdg"
    (cache / "recmerge" / "ml-100k").mkdir(parents=True)
    for name in ("u.data", "u.item"):
        shutil.copy(src / name, cache / "recmerge" / "ml-100k" / name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    r = svc.client.post("/datasets", json={"name": "movielens", "source": "ml-100k"})
    assert r.status_code == 201, r.text
    d = r.json()
    assert (d["n_users"], d["n_items"], d["n_interactions"], d["source"]) == (943, 1682, 100000, "ml-100k")
    before = svc.snapshot()
    again = svc.client.post("/datasets", json={"name": "again", "source": "ml-100k"})
    assert again.status_code == 200 and again.json()["id"] == d["id"]
    assert svc.snapshot() == before
    # Titles come back with recommendations.
    m = svc.upload_recipe(checkpoint_bytes(tmp_path, d["fingerprint"], d["n_items"]), d["id"]).json()
    recs = svc.client.get("/recommend/1", params={"model": m["id"], "k": 3}).json()["items"]
    assert len(recs) == 3 and all(x["title"] for x in recs)


def test_recipe_upload_and_model_file(svc, dataset, tmp_path):
    content = checkpoint_bytes(tmp_path, dataset["fingerprint"], dataset["n_items"], seed=3)
    r = svc.upload_recipe(content, dataset["id"], name="base", recipe='{"name": "bert4rec"}')  # agrees with the file
    assert r.status_code == 201, r.text
    m = r.json()
    assert m["kind"] == "recipe" and m["name"] == "base" and m["dataset_id"] == dataset["id"]
    assert m["recipe"] == {"name": "bert4rec"} and m["backbone"]["hidden"] == 16
    assert m["sha256"] == hashlib.sha256(content).hexdigest() and m["size"] == len(content)
    assert not any("path" in key for key in m)
    assert svc.client.get(f"/recipes/{m['id']}").json() == m
    assert svc.client.get(f"/models/{m['id']}").json() == m
    assert [x["id"] for x in svc.client.get("/recipes").json()] == [m["id"]]
    assert [x["id"] for x in svc.client.get("/models", params={"kind": "recipe"}).json()] == [m["id"]]
    assert svc.client.get("/models", params={"kind": "merged"}).json() == []
    f = svc.client.get(f"/models/{m['id']}/file")
    assert f.status_code == 200 and f.content == content
    assert 'filename="base.safetensors"' in f.headers["content-disposition"]


def _direct(svc, model_id: str, history: list[str], k: int):
    """What the library says for this history, bypassing the API."""
    served = svc.app.state.recommender
    m = svc.client.get(f"/models/{model_id}").json()
    model, _ = load_model(svc.app.state.store.path_for(m["sha256"]))
    ds = served.dataset(svc.client.get(f"/datasets/{m['dataset_id']}").json()["fingerprint"])
    ranked = recommend_history(model, [ds.item_index(i) for i in history], k, ds.n_items)
    return [(ds.item_ids[i - 1], s) for i, s in ranked]


def _pairs(rec):
    return [(x["item"], x["score"]) for x in rec["items"]]


def _same(a, b):
    assert [i for i, _ in a] == [i for i, _ in b]
    np.testing.assert_allclose([s for _, s in a], [s for _, s in b], rtol=1e-4, atol=1e-5)


def test_recommend_user_events_and_visitor(svc, dataset, recipe):
    ds = svc.app.state.recommender.dataset(dataset["fingerprint"])
    history = [ds.item_ids[i - 1] for i in ds.sequence(ds.user_index("u2"))]
    rec = svc.client.get("/recommend/u2", params={"model": recipe["id"], "k": 7}).json()
    assert rec["model_id"] == recipe["id"] and rec["user"] == "u2" and len(rec["items"]) == 7
    assert not set(history) & {x["item"] for x in rec["items"]}  # the history is excluded
    scores = [x["score"] for x in rec["items"]]
    assert scores == sorted(scores, reverse=True)
    _same(_pairs(rec), _direct(svc, recipe["id"], history, 7))

    # Events extend the history: they change the ranking's input and are excluded too.
    new = [i for i in ds.item_ids if i not in history][:3]
    r = svc.client.post("/users/u2/events", json={"items": new, "model": recipe["id"]})
    assert r.status_code == 201 and r.json() == {"dataset_id": dataset["id"], "user": "u2", "added": 3, "events": 3}
    rec2 = svc.client.get("/recommend/u2", params={"model": recipe["id"], "k": 7}).json()
    assert not set(new) & {x["item"] for x in rec2["items"]}
    _same(_pairs(rec2), _direct(svc, recipe["id"], history + new, 7))

    # A visitor with the same history gets the same answer.
    visitor = svc.client.post("/recommend", json={"model": recipe["id"], "items": history + new, "k": 7}).json()
    assert visitor["user"] is None
    _same(_pairs(visitor), _pairs(rec2))
    # Integer ids are accepted as well as strings; a visitor with no history still gets k items.
    as_int = svc.client.post("/recommend", json={"model": recipe["id"], "items": [int(i) for i in history + new],
                                                 "k": 7}).json()
    assert _pairs(as_int) == _pairs(visitor)
    assert len(svc.client.post("/recommend", json={"model": recipe["id"], "items": []}).json()["items"]) == 10


def test_new_user_becomes_known_through_events(svc, dataset, recipe):
    params = {"model": recipe["id"], "k": 5}
    assert svc.client.get("/recommend/newbie", params=params).status_code == 404
    r = svc.client.post("/users/newbie/events", json={"items": ["105", "106"], "dataset_id": dataset["id"]})
    assert r.status_code == 201
    rec = svc.client.get("/recommend/newbie", params=params).json()
    assert not {"105", "106"} & {x["item"] for x in rec["items"]}
    _same(_pairs(rec), _direct(svc, recipe["id"], ["105", "106"], 5))


def test_alias_hot_swap(svc, dataset, recipe, tmp_path):
    other = svc.upload_recipe(checkpoint_bytes(tmp_path, dataset["fingerprint"], dataset["n_items"], seed=1),
                              dataset["id"], name="other").json()
    params = {"model": "production", "k": 5}
    assert svc.client.put("/aliases/production", json={"model_id": recipe["id"]}).status_code == 200
    assert svc.client.get("/recommend/u3", params=params).json()["model_id"] == recipe["id"]
    swapped = svc.client.put("/aliases/production", json={"model_id": other["id"]})
    assert swapped.status_code == 200 and swapped.json()["model_id"] == other["id"]
    rec = svc.client.get("/recommend/u3", params=params).json()
    assert rec["model_id"] == other["id"]
    direct = svc.client.get("/recommend/u3", params={"model": other["id"], "k": 5}).json()
    assert rec["items"] == direct["items"]
    assert [(a["name"], a["model_id"]) for a in svc.client.get("/aliases").json()] == [("production", other["id"])]
    assert svc.client.get("/aliases/production").json()["model_id"] == other["id"]


def _alias_over_two_models(make_service, tmp_path, ttl: float):
    """A service with two recipes and the alias `live` on the first; returns (service, the two ids)."""
    a = make_service(ALIAS_TTL_S=ttl)
    d = a.upload_dataset()
    ids = [a.upload_recipe(checkpoint_bytes(tmp_path, d["fingerprint"], d["n_items"], seed=s), d["id"],
                           name=f"m{s}").json()["id"] for s in (1, 2)]
    a.client.put("/aliases/live", json={"model_id": ids[0]})
    return a, ids


def _switch_in_another_process(svc, name: str, model_id: str) -> None:
    """What another API process on the same database does: its own engine, its own session."""
    from app.services.models import set_alias
    from core.db import make_engine, make_sessionmaker

    with make_sessionmaker(make_engine(svc.app.state.settings.DATABASE_URL))() as s:
        set_alias(s, name, model_id)


def test_alias_switched_by_another_process_is_seen_within_ttl(make_service, tmp_path):
    a, ids = _alias_over_two_models(make_service, tmp_path, ttl=0.0)
    assert a.client.get("/recommend/u1", params={"model": "live"}).json()["model_id"] == ids[0]
    _switch_in_another_process(a, "live", ids[1])
    assert a.client.get("/recommend/u1", params={"model": "live"}).json()["model_id"] == ids[1]


def test_expired_alias_is_looked_up_once_for_a_crowd_of_requests(make_service, tmp_path):
    import asyncio
    import time

    from sqlalchemy import event

    a, ids = _alias_over_two_models(make_service, tmp_path, ttl=30.0)
    rec = a.app.state.recommender
    lookups = []
    event.listen(rec.engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *rest: lookups.append(statement) if "aliases" in statement else None)

    def crowd(n=40, then_wait_for=None):
        async def go():
            answers = await asyncio.gather(*(rec._model_id("live") for _ in range(n)))
            deadline = time.monotonic() + 10  # the loop must live on for a background refresh to land
            while then_wait_for and rec._refs["live"][0] != then_wait_for and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return answers
        return asyncio.run(go())

    assert crowd() == [ids[0]] * 40 and len(lookups) == 1  # a cold entry: one lookup shared by all
    assert crowd() == [ids[0]] * 40 and len(lookups) == 1  # a fresh entry: no lookup
    _switch_in_another_process(a, "live", ids[1])
    rec._refs["live"] = (ids[0], time.monotonic() - 1.0)  # expired a second ago: within the grace of one TTL
    assert crowd(then_wait_for=ids[1]) == [ids[0]] * 40  # answered at once from the entry...
    assert rec._refs["live"][0] == ids[1] and len(lookups) == 2  # ...while exactly one lookup refreshed it
    rec._refs["live"] = (ids[0], time.monotonic() - 61.0)  # older than twice the TTL: never served
    assert crowd() == [ids[1]] * 40 and len(lookups) == 3


def test_health_ready_metrics(svc, dataset, recipe):
    assert svc.client.get("/healthz").json() == {"status": "ok"}
    assert svc.client.get("/readyz").json() == {"status": "ok", "database": "ok", "store": "ok"}
    for _ in range(3):
        svc.client.get("/recommend/u1", params={"model": recipe["id"]})
    svc.client.get("/recommend/u1", params={"model": recipe["id"], "k": 0})
    text = svc.client.get("/metrics").text
    assert 'recmerge_http_requests_total{method="GET",route="/recommend/{user}",status="200"} 3.0' in text
    assert 'recmerge_http_requests_total{method="GET",route="/recommend/{user}",status="422"} 1.0' in text
    assert 'recmerge_http_request_seconds_count{method="GET",route="/recommend/{user}"} 4.0' in text
    assert "recmerge_recommend_batch_size_count 3.0" in text
    assert 'recmerge_model_cache_total{result="miss"} 1.0' in text
    assert 'recmerge_model_cache_total{result="hit"}' in text


def test_api_on_an_s3_store(make_service, s3_endpoint, tmp_path):
    svc = make_service(STORE_URL="s3://recmerge-test/api", S3_ENDPOINT_URL=s3_endpoint)
    d = svc.upload_dataset()
    content = checkpoint_bytes(tmp_path, d["fingerprint"], d["n_items"])
    m = svc.upload_recipe(content, d["id"]).json()
    store = svc.app.state.store
    assert list(store.objects()) == [m["sha256"]] and list(store.dirs()) == [d["fingerprint"]]
    assert svc.client.get(f"/models/{m['id']}/file").content == content
    rec = svc.client.get("/recommend/u2", params={"model": m["id"], "k": 4})
    assert rec.status_code == 200 and len(rec.json()["items"]) == 4
