"""POST /merge-jobs with the methods that choose their coefficients on the dataset (weight-search, regmean,
adamerging): the job runs on the embedded workers, reports what the method chose in its result (every
candidate's validation score, the learned coefficients), the merged model records it, and bad options are
refused with 422 before any job or file exists."""

from __future__ import annotations

import pytest
import yaml
from fastapi.testclient import TestClient

from app.main import create_app
from tests.app.conftest import Service, checkpoint_bytes, interactions_csv, make_settings


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-data")
    with TestClient(create_app(make_settings(root / "svc"))) as client:
        yield Service(client, None)


@pytest.fixture(scope="module")
def world(svc, tmp_path_factory):
    ds = svc.upload_dataset(interactions_csv(n_users=30), name="merge-data")
    tmp = tmp_path_factory.mktemp("up")
    ids = []
    for seed in (1, 2, 3):
        r = svc.upload_recipe(checkpoint_bytes(tmp, ds["fingerprint"], ds["n_items"], seed=seed), ds["id"],
                              name=f"m{seed}")
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return {"dataset": ds, "models": ids[:2], "base": ids[2]}


def post(svc, body: dict) -> dict:
    r = svc.client.post("/merge-jobs", json=body)
    assert r.status_code == 202, r.text
    return svc.finished(f"/merge-jobs/{r.json()['id']}")


def test_weight_search_job_reports_every_candidate_and_keeps_the_best(svc, world):
    job = post(svc, {"method": "weight-search", "model_ids": world["models"], "options": {"grid": 5}})
    res = job["result"]
    assert [c["coefficients"] for c in res["candidates"]] == [[lam, 1 - lam] for lam in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert res["score"] == max(c["score"] for c in res["candidates"])
    assert job["progress"]["fraction"] == 1.0
    model = svc.client.get(f"/models/{job['result_model_id']}").json()
    assert model["merge"]["search"] == {k: res[k] for k in ("coefficients", "score", "candidates")}
    # The score the search kept is the merged model's own validation NDCG@10, measured again by the job.
    assert job["merged"]["metrics"]["valid"]["full"]["ndcg@10"] == pytest.approx(res["score"], abs=1e-6)


def test_the_job_hears_of_every_candidate(svc, world, monkeypatch):
    from workers.attempt import Attempt

    heard, original = [], Attempt.progress

    def recording(self, stage, fraction):
        heard.append((stage, fraction))
        return original(self, stage, fraction)

    monkeypatch.setattr(Attempt, "progress", recording)  # the in-process runner's attempts call it
    job = post(svc, {"method": "weight-search", "model_ids": world["models"], "options": {"grid": 4},
                     "evaluate": False})
    search = [f for stage, f in heard if stage == "weight-search"]
    # One report per candidate (then the closing 1.0), on the job's own 0..1 scale, never going back.
    assert len(search) == len(job["result"]["candidates"]) + 1 == 5
    assert search == sorted(search) and 0 < search[0] and search[-1] == 1.0


def test_weight_search_over_fisher_weights_runs_the_fisher_jobs_first(svc, world):
    job = post(svc, {"method": "weight-search", "model_ids": world["models"], "evaluate": False,
                     "options": {"combine": "fisher", "grid": 3}, "fisher": {"sampling": "topk", "n": 3}})
    assert sorted(c["kind"] for c in job["children"]) == ["fisher", "fisher"]
    assert [c["coefficients"] for c in job["result"]["candidates"]] == [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    model = svc.client.get(f"/models/{job['result_model_id']}").json()
    assert [f["sampling"] for f in model["merge"]["fishers"]] == ["topk", "topk"]


def test_weight_search_over_task_vectors_as_a_yaml_config(svc, world):
    config = {"merge_method": "weight-search", "evaluate": False, "base_model": world["base"],
              "models": [{"model": m} for m in world["models"]],
              "parameters": {"combine": "task-vectors", "grid": 3, "rounds": 1}}
    r = svc.client.post("/merge-jobs", content=yaml.safe_dump(config), headers={"content-type": "application/yaml"})
    assert r.status_code == 202, r.text
    job = svc.finished(f"/merge-jobs/{r.json()['id']}")
    assert job["request"]["base_model_id"] == world["base"]
    cands = job["result"]["candidates"]
    assert cands[0]["coefficients"] == [0.5, 0.5] and len(cands) == 1 + 2 * 3 - 2  # start, then 2 new per model


def test_regmean_job_solves_the_linear_layers_on_a_user_sample(svc, world):
    job = post(svc, {"method": "regmean", "model_ids": world["models"], "options": {"users": 12, "alpha": 0.7},
                     "evaluate": False})
    solved = job["result"]["solved"]
    assert "blocks.0.attn.qkv.weight" in solved and "blocks.0.ffn.fc2.weight" in solved
    model = svc.client.get(f"/models/{job['result_model_id']}").json()
    assert model["merge"]["solved"] == solved
    assert model["merge"]["options"] == {"alpha": 0.7, "ridge": 1e-6, "users": 12, "seed": 0}
    # The same ingredients plainly averaged differ exactly in the solved layers.
    uniform = post(svc, {"method": "uniform", "model_ids": world["models"], "evaluate": False})
    a = _tensors(svc, job["result_model_id"])
    b = _tensors(svc, uniform["result_model_id"])
    assert {k for k in a if not (a[k] == b[k]).all()} == set(solved)


def test_adamerging_job_learns_and_reports_per_block_coefficients(svc, world):
    job = post(svc, {"method": "adamerging", "model_ids": world["models"], "base_model_id": world["base"],
                     "options": {"steps": 4, "users": 12, "granularity": "block", "lr": 0.05}, "evaluate": False})
    res = job["result"]
    merged = _tensors(svc, job["result_model_id"])
    assert set(res["coefficients"]) == {"blocks.0" if k.startswith("blocks.0.") else k.split(".")[0] for k in merged}
    assert all(len(c) == 2 and 0.0 <= min(c) and max(c) <= 1.0 for c in res["coefficients"].values())
    assert len(res["losses"]) == 4 and res["final_loss"] > 0
    model = svc.client.get(f"/models/{job['result_model_id']}").json()
    assert model["merge"]["learned"] == {k: res[k] for k in ("coefficients", "losses", "final_loss")}
    # The file is task arithmetic at the learnt coefficients.
    a, b, base = (_tensors(svc, m) for m in [*world["models"], world["base"]])
    lam = res["coefficients"]["blocks.0"]
    k = "blocks.0.ffn.fc1.weight"
    want = base[k] + lam[0] * (a[k] - base[k]) + lam[1] * (b[k] - base[k])
    assert (merged[k] - want).abs().max() < 1e-6


def _tensors(svc, model_id: str) -> dict:
    from safetensors.torch import load

    return load(svc.client.get(f"/models/{model_id}/file").content)


@pytest.mark.parametrize("body, field", [
    ({"method": "adamerging", "options": {"steps": 0}}, "steps"),
    ({"method": "adamerging", "options": {"objective": "mse"}}, "objective"),
    ({"method": "adamerging"}, "base_model_id"),
    ({"method": "regmean", "options": {"alpha": 2}}, "alpha"),
    ({"method": "regmean", "options": {"ridge": -1}}, "ridge"),
    ({"method": "weight-search", "options": {"grid": 1}}, "grid"),
    ({"method": "weight-search", "options": {"combine": "task-vectors"}}, "base_model_id"),
    ({"method": "weight-search", "weights": [1.0, 2.0]}, "weights"),
    ({"method": "weight-search", "fisher": {"sampling": "topk", "n": 3}}, "uses no Fisher"),
])
def test_bad_options_are_refused_before_any_job_or_file(svc, world, body, field):
    before = svc.snapshot()
    r = svc.client.post("/merge-jobs", json={"model_ids": world["models"], **body})
    assert r.status_code == 422, r.text
    assert field in r.text
    assert svc.snapshot() == before
