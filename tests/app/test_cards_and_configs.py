"""Model cards for uploaded, trained and merged models (GET /models/{id}/card), and POST /merge-jobs taking
the merge config `recmerge merge --config` reads, as YAML or JSON. Jobs run on the embedded runner."""

from __future__ import annotations

import pytest
import yaml
from fastapi.testclient import TestClient

from app.main import create_app
from models.checkpoint import read_metadata
from tests.app.conftest import Service, checkpoint_bytes, interactions_csv, make_settings

TINY = {"hidden": 16, "layers": 1, "heads": 2, "inner": 32, "max_len": 20, "batch_size": 64, "epochs": 1}


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    root = tmp_path_factory.mktemp("cards")
    with TestClient(create_app(make_settings(root / "svc"))) as client:
        yield Service(client, None)


@pytest.fixture(scope="module")
def world(svc, tmp_path_factory):
    ds = svc.upload_dataset(interactions_csv(n_users=30), name="cards")
    up = svc.upload_recipe(checkpoint_bytes(tmp_path_factory.mktemp("up"), ds["fingerprint"], ds["n_items"]),
                           ds["id"], name="uploaded-one")
    assert up.status_code == 201, up.text
    trained = []
    for seed in (1, 2):
        r = svc.client.post("/train-jobs", json={"dataset_id": ds["id"], "name": f"trained-{seed}", "seed": seed,
                                                 **TINY})
        assert r.status_code == 202, r.text
        trained.append(r.json()["id"])
    trained = [svc.finished(f"/jobs/{j}")["result"]["model_id"] for j in trained]
    config = {"merge_method": "weighted", "name": "merged-by-config",
              "models": [{"model": trained[0], "parameters": {"weight": 3}},
                         {"model": trained[1], "parameters": {"weight": 1}}]}
    r = svc.client.post("/merge-jobs", content=yaml.safe_dump(config), headers={"content-type": "application/yaml"})
    assert r.status_code == 202, r.text
    merged = svc.finished(f"/merge-jobs/{r.json()['id']}")
    return {"dataset": ds, "uploaded": up.json()["id"], "trained": trained, "merged": merged["result_model_id"]}


def card(svc, model_id: str) -> str:
    r = svc.client.get(f"/models/{model_id}/card")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/markdown")
    return r.text


def test_a_yaml_config_runs_as_a_merge_job_and_the_merge_records_it(svc, world):
    m = svc.client.get(f"/models/{world['merged']}").json()
    assert m["name"] == "merged-by-config" and m["merge"]["weights"] == [3.0, 1.0]
    assert m["merge"]["config"] == {
        "merge_method": "weighted", "base_model": None, "parameters": {}, "fisher": None, "dataset": None,
        "models": [{"model": world["trained"][0], "parameters": {"weight": 3.0}},
                   {"model": world["trained"][1], "parameters": {"weight": 1.0}}]}


def test_the_same_config_as_json_is_the_same_job_request(svc, world):
    config = {"merge_method": "weighted", "evaluate": False,
              "models": [{"model": world["trained"][0], "parameters": {"weight": 3}},
                         {"model": world["trained"][1], "parameters": {"weight": 1}}]}
    r = svc.client.post("/merge-jobs", json=config)
    assert r.status_code == 202, r.text
    req = r.json()["request"]
    assert (req["method"], req["model_ids"], req["weights"], req["evaluate"]) == (
        "weighted", world["trained"], [3.0, 1.0], False)
    svc.finished(f"/merge-jobs/{r.json()['id']}")


def test_an_invalid_config_is_refused_field_by_field_and_queues_nothing(svc, world):
    before = svc.counts()["jobs"]
    bad = {"merge_method": "ties", "dataset": "data/x",
           "models": [{"model": world["trained"][0], "parameters": {"weight": -2, "fisher": "f.safetensors"}}],
           "parameters": {"density": 3}}
    r = svc.client.post("/merge-jobs", content=yaml.safe_dump(bad), headers={"content-type": "application/yaml"})
    assert r.status_code == 422, r.text
    errors = {".".join(map(str, e["loc"])): e["msg"] for e in r.json()["errors"]}
    assert set(errors) == {"body.parameters.density", "body.models.0.parameters.weight",
                           "body.models.0.parameters.fisher", "body.base_model"}
    assert "less than or equal to 1" in errors["body.parameters.density"]
    r = svc.client.post("/merge-jobs", content=b"merge_method: [", headers={"content-type": "application/yaml"})
    assert r.status_code == 422 and "not YAML or JSON" in r.text
    r = svc.client.post("/merge-jobs", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "expected a JSON object" in r.text
    assert svc.counts()["jobs"] == before


def test_card_of_an_uploaded_model(svc, world):
    text = card(svc, world["uploaded"])
    assert text.startswith("# uploaded-one\n") and "An uploaded checkpoint" in text
    assert "Uploaded as a finished checkpoint" in text
    assert "Not reproducible from recmerge alone" in text


def test_card_of_a_trained_model_names_its_request_and_metrics(svc, world):
    text = card(svc, world["trained"][0])
    assert text.startswith("# trained-1\n") and "A model trained by recmerge" in text
    assert "Trained by recmerge from scratch: 1 epoch(s) run" in text
    assert "| **trained-1** | 0." in text  # its metrics row
    assert "POST this request to `/train-jobs`" in text and '"seed": 1' in text


def test_card_of_a_merged_model_shows_lineage_metrics_beside_ingredients_and_its_config(svc, world):
    text = card(svc, world["merged"])
    assert text.startswith("# merged-by-config\n") and "Merged with `weighted` from:" in text
    for i, mid in enumerate(world["trained"], 1):
        assert f"| {i} | trained-{i} (`{mid}`) |" in text  # lineage: name and id of each ingredient
        assert f"\n| trained-{i} | 0." in text  # ...and its metrics beside the merge's
    assert "| **merged-by-config** | 0." in text
    assert "POST this config to `/merge-jobs`" in text and "merge_method: weighted" in text
    assert svc.client.get("/models/nope/card").status_code == 404


def test_the_card_config_is_what_the_file_records(svc, world, tmp_path):
    r = svc.client.get(f"/models/{world['merged']}/file")
    path = tmp_path / "m.safetensors"
    path.write_bytes(r.content)
    recorded = read_metadata(path).merge["config"]
    block = card(svc, world["merged"]).split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(block) == recorded
