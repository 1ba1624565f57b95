"""The job routes refuse bad requests before anything is queued: the status, the message, and no job row.
Jobs here are never run (the app is built without its runner); running them is the e2e tests' part."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.conftest import Service, checkpoint_bytes, interactions_csv, make_settings

TOKEN = "job-token"


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    """One service for the module: every test compares job counts before and after, so they share it."""
    root = tmp_path_factory.mktemp("jobs-api")
    with TestClient(create_app(make_settings(root / "svc", API_TOKEN=TOKEN), jobs=False)) as client:
        yield Service(client, TOKEN)


@pytest.fixture(scope="module")
def world(svc, tmp_path_factory):
    """Two datasets; on the first three models (two alike, one with another width), on the second one."""
    tmp = tmp_path_factory.mktemp("ckpts")
    d1 = svc.upload_dataset(name="one")
    d2 = svc.upload_dataset(interactions_csv(seed=5), name="two")

    def recipe(ds, seed, **backbone):
        r = svc.upload_recipe(checkpoint_bytes(tmp, ds["fingerprint"], ds["n_items"], seed=seed, **backbone),
                              ds["id"], name=f"r{seed}")
        assert r.status_code == 201, r.text
        return r.json()["id"]

    return {"d1": d1["id"], "d2": d2["id"], "a": recipe(d1, 1), "b": recipe(d1, 2), "wide": recipe(d1, 3, hidden=32),
            "other": recipe(d2, 4)}


def _post(svc, path, body, status, message=None, **kw):
    before = svc.counts()["jobs"]
    r = svc.client.post(path, json=body, headers=kw.get("headers", svc.headers))
    assert r.status_code == status, r.text
    if message is not None:
        text = " ".join([r.json()["detail"], *(f"{e['loc']} {e['msg']}" for e in r.json()["errors"])])
        assert message in text, text
    if status >= 400:
        assert svc.counts()["jobs"] == before, "a refused request left a job behind"
    return r.json()


@pytest.mark.parametrize("body, status, message", [
    ({"dataset_id": "nope"}, 404, "dataset_id: dataset 'nope' not found"),
    ({"dataset_id": "{d1}", "recipe": "bogus"}, 422, "unknown recipe 'bogus'"),
    ({"dataset_id": "{d1}", "options": {"mask_prob": "x"}}, 422, "recipe 'bert4rec': mask_prob"),
    ({"dataset_id": "{d1}", "options": {"nope": 1}}, 422, "nope: not an option of this recipe"),
    ({"dataset_id": "{d1}", "epochs": 0}, 422, "epochs"),
    ({"dataset_id": "{d1}", "hidden": 30, "heads": 4}, 422, "hidden (30) must be divisible by heads (4)"),
    # heads left unset: bert4rec's own (models/config.py DESIGN), checked before anything is queued
    ({"dataset_id": "{d1}", "hidden": 31}, 422, "hidden (31) must be divisible by heads (2)"),
    ({"dataset_id": "{d1}", "init_model_id": "nope"}, 404, "init_model_id: model 'nope' not found"),
    ({"dataset_id": "{d1}", "init_model_id": "{other}", "hidden": 16, "layers": 1, "inner": 32, "max_len": 20},
     409, "was trained on dataset"),  # both exist; they do not fit together
    ({"dataset_id": "{d1}", "init_model_id": "{a}"}, 409, "init_model_id: model"),  # 64 wide vs its 16
    ({"dataset_id": "{d1}", "out": "/etc/passwd"}, 422, "out"),  # no field names a server path
])
def test_train_job_refusals(svc, world, body, status, message):
    body = {k: v.format(**world) if isinstance(v, str) else v for k, v in body.items()}
    _post(svc, "/train-jobs", body, status, message)


@pytest.mark.parametrize("body, status, message", [
    ({"method": "uniform", "model_ids": ["{a}", "nope"]}, 404, "model_ids: model 'nope' not found"),
    ({"method": "bogus", "model_ids": ["{a}", "{b}"]}, 422, "unknown merge method 'bogus'"),
    ({"method": "weighted", "model_ids": ["{a}", "{b}"], "weights": [1.0]}, 422, "weights has 1 entries for 2"),
    ({"method": "uniform", "model_ids": ["{a}", "{a}"]}, 422, "lists a model twice"),
    ({"method": "uniform", "model_ids": []}, 422, "model_ids"),
    ({"method": "uniform", "model_ids": ["{a}", "{other}"]}, 409, "only models of one dataset merge"),
    ({"method": "uniform", "model_ids": ["{a}", "{wide}"]}, 409, "has backbone hidden=32"),
    ({"method": "task-arithmetic", "model_ids": ["{a}", "{b}"]}, 422, "needs a base model"),
    ({"method": "uniform", "model_ids": ["{a}"], "base_model_id": "{b}"}, 422, "does not use a base model"),
    ({"method": "uniform", "model_ids": ["{a}", "{b}"], "fisher": {"sampling": "target"}}, 422, "uses no Fisher"),
    ({"method": "fisher", "model_ids": ["{a}", "{b}"], "fisher": {"sampling": "all"}}, 422, "sampling"),
    ({"method": "fisher", "model_ids": ["{a}", "{b}"], "fisher": {"sampling": "exact", "n": 3}}, 422,
     "n applies to sampling random/topk/model only"),
    ({"method": "fisher", "model_ids": ["{a}", "{b}"], "fisher": {"sampling": "topk", "n": 999}}, 409,
     "fisher.n: 999 items per sequence, but the dataset has 30"),
    ({"method": "ties", "model_ids": ["{a}"], "base_model_id": "{b}", "options": {"density": 7}}, 422, "density"),
])
def test_merge_job_refusals(svc, world, body, status, message):
    def fill(v):
        if isinstance(v, str):
            return v.format(**world)
        return [fill(x) for x in v] if isinstance(v, list) else v

    _post(svc, "/merge-jobs", {k: fill(v) for k, v in body.items()}, status, message)


def test_writes_need_the_token(svc, world):
    no = {"Authorization": "Bearer wrong"}
    _post(svc, "/train-jobs", {"dataset_id": world["d1"]}, 401, "wrong API token", headers=no)
    _post(svc, "/merge-jobs", {"method": "uniform", "model_ids": [world["a"], world["b"]]}, 401, headers={})
    job = _post(svc, "/merge-jobs", {"method": "uniform", "model_ids": [world["a"], world["b"]]}, 202)
    assert svc.client.delete(f"/merge-jobs/{job['id']}").status_code == 401
    assert svc.client.get(f"/merge-jobs/{job['id']}").json()["status"] == "queued"  # reads need no token


def test_fisher_merge_fans_out_and_cancel_reaches_every_sub_job(svc, world):
    job = _post(svc, "/merge-jobs", {"method": "fisher", "model_ids": [world["a"], world["b"]],
                                     "fisher": {"sampling": "topk", "n": 3}, "evaluate": True}, 202)
    assert job["status"] == "queued" and job["progress"]["stage"] == "waiting"
    assert sorted(c["kind"] for c in job["children"]) == ["evaluate", "evaluate", "fisher", "fisher"]
    assert job["request"]["fisher"] == {"sampling": "topk", "n": 3, "computation": "per-example", "seed": 0,
                                        "max_users": None, "batch_size": 64}
    assert "children" not in job["request"]
    r = svc.client.delete(f"/merge-jobs/{job['id']}", headers=svc.headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "cancelled" and {c["status"] for c in body["children"]} == {"cancelled"}
    again = svc.client.delete(f"/merge-jobs/{job['id']}", headers=svc.headers)
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]


def test_unknown_jobs_are_404(svc, world):
    assert svc.client.get("/merge-jobs/nope").status_code == 404
    assert svc.client.get("/jobs/nope").json() == {"detail": "job 'nope' not found", "errors": []}
    train = _post(svc, "/train-jobs", {"dataset_id": world["d1"]}, 202)
    assert train["kind"] == "train" and svc.client.get(f"/jobs/{train['id']}").status_code == 200
    # A train job is not a merge job.
    assert svc.client.get(f"/merge-jobs/{train['id']}").json() == {"detail": f"merge job '{train['id']}' not found",
                                                                  "errors": []}
    assert svc.client.delete("/merge-jobs/nope", headers=svc.headers).status_code == 404


def test_idempotency_key_returns_the_first_job(svc, world):
    h = {**svc.headers, "Idempotency-Key": "abc-1"}
    before = svc.counts()["jobs"]
    first = svc.client.post("/train-jobs", json={"dataset_id": world["d1"]}, headers=h).json()
    second = svc.client.post("/train-jobs", json={"dataset_id": world["d1"], "epochs": 3}, headers=h).json()
    assert first["id"] == second["id"] and svc.counts()["jobs"] == before + 1
    merge = {"method": "fisher", "model_ids": [world["a"], world["b"]], "fisher": {"sampling": "topk", "n": 2}}
    m1 = svc.client.post("/merge-jobs", json=merge, headers={**svc.headers, "Idempotency-Key": "m-1"})
    m2 = svc.client.post("/merge-jobs", json=merge, headers={**svc.headers, "Idempotency-Key": "m-1"})
    assert (m1.status_code, m2.status_code) == (202, 202) and m1.json()["id"] == m2.json()["id"]
    assert svc.counts()["jobs"] == before + 1 + 1 + 4  # the train job, the merge job and its four sub-jobs
