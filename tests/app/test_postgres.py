"""The same API on PostgreSQL (a database of the test's own), migrated by `upgrade` as a deployment does."""

from __future__ import annotations

from app.migrate import upgrade
from tests.app.conftest import checkpoint_bytes


def test_api_flow_on_postgres(make_service, postgres_url, tmp_path):
    upgrade(postgres_url)
    # A broker URL makes the app non-embedded: it must not migrate by itself, and here runs no jobs.
    svc = make_service(DATABASE_URL=postgres_url, BROKER_URL="redis://127.0.0.1:1/0")
    d = svc.upload_dataset()
    content = checkpoint_bytes(tmp_path, d["fingerprint"], d["n_items"])
    m = svc.upload_recipe(content, d["id"]).json()
    assert svc.upload_recipe(content, d["id"]).status_code == 200  # unique (kind, sha256) holds on PostgreSQL
    assert svc.client.put("/aliases/production", json={"model_id": m["id"]}).status_code == 200
    r = svc.client.post("/users/u2/events", json={"items": ["101", "102"], "model": "production"})
    assert r.status_code == 201 and r.json()["events"] == 2
    rec = svc.client.get("/recommend/u2", params={"model": "production", "k": 5}).json()
    assert rec["model_id"] == m["id"] and len(rec["items"]) == 5
    assert not {"101", "102"} & {x["item"] for x in rec["items"]}
    before = svc.snapshot()
    bad = svc.upload_recipe(checkpoint_bytes(tmp_path, "0" * 64, d["n_items"]), d["id"])
    assert bad.status_code == 422 and "fingerprint" in bad.json()["detail"]
    assert svc.client.post("/users/u2/events", json={"items": ["nope"], "model": "production"}).status_code == 404
    assert svc.snapshot() == before
    assert before[0] == {"datasets": 1, "jobs": 0, "models": 1, "aliases": 1, "fishers": 0, "events": 2}
