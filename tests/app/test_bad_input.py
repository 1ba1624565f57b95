"""Every refusal of SPEC §8: the status, a message that says what is wrong, and nothing stored."""

from __future__ import annotations

import io
import json

import httpx
import pytest
import torch

from tests.app.conftest import TOKEN, checkpoint_bytes, interactions_csv, multipart_stream


@pytest.fixture
def unchanged(svc):
    """Asserts at the end of the test that no row and no file was added or removed."""
    before = svc.snapshot()
    yield
    assert svc.snapshot() == before


def refused(r: httpx.Response, status: int, *needles: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body["detail"], str) and isinstance(body["errors"], list), body  # one shape for all
    detail = json.dumps(body)
    for needle in needles:
        assert needle in detail, f"{needle!r} not in {detail}"


# --- auth -----------------------------------------------------------------------------------------
def test_write_calls_need_the_token(make_service, tmp_path):
    svc = make_service(token=TOKEN)
    before = svc.snapshot()
    csv = interactions_csv()
    calls = [
        ("post", "/datasets", dict(json={"name": "x", "source": "ml-100k"})),
        ("post", "/datasets", dict(data={"name": "x"}, files={"file": ("i.csv", io.BytesIO(csv))})),
        ("post", "/recipes", dict(data={"name": "r", "dataset_id": "d"}, files={"file": ("r.safetensors", b"x")})),
        ("put", "/aliases/production", dict(json={"model_id": "m"})),
        ("post", "/users/u1/events", dict(json={"items": ["101"], "dataset_id": "d"})),
    ]
    for method, url, kw in calls:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eDp5"}):
            r = getattr(svc.client, method)(url, headers=headers, **kw)
            assert r.status_code == 401, (method, url, headers, r.text)
            assert "token" in r.json()["detail"].lower() or "not authenticated" in r.json()["detail"].lower()
            assert r.headers["www-authenticate"] == "Bearer"
    assert svc.snapshot() == before
    # Reads need no token, and the right token opens the writes.
    assert svc.client.get("/datasets").status_code == 200
    assert svc.upload_dataset(csv)["n_items"] == 30


# --- datasets -------------------------------------------------------------------------------------
def test_dataset_source_must_be_builtin_name_not_a_path(svc, unchanged):
    for source in ("ml-10m", "/etc/passwd", "../shared/data/ml-100k", "file:///etc"):
        refused(svc.client.post("/datasets", json={"name": "x", "source": source}), 422, "source", "ml-100k")
    refused(svc.client.post("/datasets", json={"name": "x", "source": "ml-100k", "path": "/tmp/x"}), 422, "path")


@pytest.mark.parametrize("content, filename, needles", [
    (b"", "empty.csv", ["empty.csv", "empty"]),
    (b"user,item,ts\nu1,101,notatime\nu1,102,2\n", "bad.csv", ["bad.csv"]),
    (b"who,what\na,b\n", "cols.csv", ["cols.csv", "user"]),
])
def test_dataset_upload_unreadable(svc, unchanged, content, filename, needles):
    r = svc.client.post("/datasets", data={"name": "x"}, files={"file": (filename, io.BytesIO(content))})
    refused(r, 422, *needles)
    assert str(svc.app.state.settings.DATA_DIR) not in r.text  # no server path in any message


def test_dataset_filters_leave_nothing(svc, unchanged):
    r = svc.client.post("/datasets", data={"name": "x", "min_user": "1000"},
                        files={"file": ("i.csv", io.BytesIO(interactions_csv()))})
    refused(r, 422, "no interactions left", "min_user=1000")
    refused(svc.client.post("/datasets", data={"name": "x", "min_user": "2"},
                            files={"file": ("i.csv", io.BytesIO(interactions_csv()))}), 422, "min_user")


def test_dataset_upload_without_file_or_with_unknown_type(svc, unchanged):
    refused(svc.client.post("/datasets", data={"name": "x"}, files={"other": ("a", b"1")}), 422, "file")
    refused(svc.client.post("/datasets", content=b"name=x", headers={"content-type": "text/plain"}), 415,
            "application/json")
    refused(svc.client.post("/datasets", content=b"{not json", headers={"content-type": "application/json"}),
            422, "JSON")


def test_unknown_dataset(svc, unchanged):
    refused(svc.client.get("/datasets/nope"), 404, "dataset 'nope' not found")


# --- size limit -----------------------------------------------------------------------------------
def test_oversized_uploads_413(make_service, tmp_path):
    svc = make_service(MAX_UPLOAD_BYTES=4096)
    before = svc.snapshot()
    big = b"\0" * 5000
    for url, data in (("/recipes", {"name": "r", "dataset_id": "d"}), ("/datasets", {"name": "x"})):
        r = svc.client.post(url, data=data, files={"file": ("big.safetensors", io.BytesIO(big))})
        refused(r, 413, "4096 bytes")
        # Without a Content-Length the limit is enforced while the body streams in.
        body, ctype = multipart_stream(data, "big", iter([big[:2500], big[2500:]]))
        r = svc.client.post(url, content=body, headers={"content-type": ctype})
        assert "content-length" not in r.request.headers
        refused(r, 413, "4096 bytes")
    assert svc.snapshot() == before


# --- recipes --------------------------------------------------------------------------------------
def _nan(state):
    state["blocks.0.ffn.fc1.weight"][3, 4] = float("nan")


def _inf(state):
    state["out_bias"][0] = float("inf")


def _shape(state):
    state["head.weight"] = torch.zeros(16, 15)


def _missing(state):
    del state["head.bias"]


def _extra(state):
    state["evil"] = torch.zeros(2)


@pytest.mark.parametrize("tamper, needles", [
    (_nan, ["blocks.0.ffn.fc1.weight", "NaN or Inf"]),
    (_inf, ["out_bias", "NaN or Inf"]),
    (_shape, ["head.weight", "shape (16, 15)", "expects (16, 16)"]),
    (_missing, ["tensor names do not match", "head.bias"]),
    (_extra, ["tensor names do not match", "evil"]),
])
def test_recipe_bad_tensors_422(svc, dataset, tmp_path, tamper, needles):
    before = svc.snapshot()
    content = checkpoint_bytes(tmp_path, dataset["fingerprint"], dataset["n_items"], tamper=tamper)
    r = svc.upload_recipe(content, dataset["id"], filename="mine.safetensors")
    refused(r, 422, "mine.safetensors", *needles)
    assert svc.snapshot() == before


def test_recipe_wrong_fingerprint_or_items_422(svc, dataset, tmp_path):
    before = svc.snapshot()
    r = svc.upload_recipe(checkpoint_bytes(tmp_path, "f" * 64, dataset["n_items"]), dataset["id"])
    refused(r, 422, "fingerprint ffffffffffff", dataset["fingerprint"][:12])
    r = svc.upload_recipe(checkpoint_bytes(tmp_path, dataset["fingerprint"], dataset["n_items"] + 1), dataset["id"])
    refused(r, 422, f"has {dataset['n_items'] + 1} items")
    assert svc.snapshot() == before


def test_recipe_not_safetensors_or_truncated_400(svc, dataset, tmp_path):
    before = svc.snapshot()
    good = checkpoint_bytes(tmp_path, dataset["fingerprint"], dataset["n_items"])
    cases = [
        (b"PK\x03\x04 this is a zip, not safetensors", "model.safetensors", "not a safetensors file"),
        (b"\x80\x04\x95pickle", "model.pt", "pickled checkpoints (.pt) are refused"),
        (good[:-100], "cut.safetensors", "truncated"),
        (good[:5], "tiny.safetensors", "too short"),
    ]
    for content, filename, needle in cases:
        r = svc.upload_recipe(content, dataset["id"], filename=filename)
        refused(r, 400, filename, needle)
        assert str(svc.app.state.settings.DATA_DIR) not in r.text
    assert svc.snapshot() == before


def test_recipe_metadata_refused_422(svc, dataset, tmp_path):
    from safetensors.torch import save

    before = svc.snapshot()
    plain = save({"w": torch.zeros(2)}, metadata={"format": "pt"})
    refused(svc.upload_recipe(plain, dataset["id"]), 422, "not a recmerge checkpoint")
    good = checkpoint_bytes(tmp_path, dataset["fingerprint"], dataset["n_items"])
    refused(svc.upload_recipe(good, dataset["id"], recipe="{oops"), 422, "recipe", "JSON")
    refused(svc.upload_recipe(good, dataset["id"], recipe="[1, 2]"), 422, "recipe", "object")
    refused(svc.upload_recipe(good, "no-such-dataset"), 404, "dataset 'no-such-dataset' not found")
    refused(svc.client.post("/recipes", data={"name": "r"}, files={"file": ("r.safetensors", good)}), 422,
            "dataset_id")
    assert svc.snapshot() == before


def test_same_recipe_twice_is_registered_once(svc, dataset, tmp_path):
    content = checkpoint_bytes(tmp_path, dataset["fingerprint"], dataset["n_items"], seed=7)
    first = svc.upload_recipe(content, dataset["id"])
    assert first.status_code == 201
    before = svc.snapshot()
    again = svc.upload_recipe(content, dataset["id"], name="again")
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert again.json()["name"] == "r"
    assert svc.snapshot() == before


# --- models and aliases ---------------------------------------------------------------------------
def test_unknown_models_and_aliases_404(svc, recipe, unchanged):
    refused(svc.client.get("/models/nope"), 404, "model 'nope' not found")
    refused(svc.client.get("/models/nope/file"), 404, "model 'nope' not found")
    refused(svc.client.get("/recipes/nope"), 404, "recipe 'nope' not found")
    refused(svc.client.get("/aliases/nope"), 404, "alias 'nope' not found")
    refused(svc.client.put("/aliases/production", json={"model_id": "nope"}), 404, "model 'nope' not found")
    refused(svc.client.put("/aliases/-bad", json={"model_id": recipe["id"]}), 422, "name")


# --- recommend ------------------------------------------------------------------------------------
def test_recommend_refusals(svc, dataset, recipe, unchanged):
    n = dataset["n_items"]
    get = svc.client.get
    refused(get("/recommend/u1", params={"model": "nope"}), 404, "model or alias 'nope' not found")
    refused(get("/recommend/nobody", params={"model": recipe["id"]}), 404, "user 'nobody' not found")
    for k in (0, -3):
        refused(get("/recommend/u1", params={"model": recipe["id"], "k": k}), 422, "k")
    r = get("/recommend/u1", params={"model": recipe["id"], "k": n + 1})  # past the catalogue: all of it
    assert r.status_code == 200 and len(r.json()["items"]) <= n, r.text  # u1 has seen every item
    refused(get("/recommend/u1", params={"k": 3}), 422, "model")
    post = svc.client.post
    # An item the dataset does not know is a thing named that does not exist, as an unknown user is.
    refused(post("/recommend", json={"model": recipe["id"], "items": ["101", "999"]}), 404, "unknown item '999'")
    r = post("/recommend", json={"model": recipe["id"], "items": ["101"], "k": n + 1})
    assert r.status_code == 200 and len(r.json()["items"]) == n - 1, r.text  # every item but the history's
    refused(post("/recommend", json={"model": recipe["id"], "items": ["101"], "k": 3.5}), 422, "k")
    refused(post("/recommend", json={"model": recipe["id"], "items": ["101"], "k": True}), 422, "k")
    refused(post("/recommend", json={"model": "nope", "items": ["101"]}), 404, "'nope' not found")


# --- events ---------------------------------------------------------------------------------------
def test_event_refusals(svc, dataset, recipe, unchanged):
    post = svc.client.post
    refused(post("/users/u1/events", json={"items": ["101", "999"], "dataset_id": dataset["id"]}), 404,
            "unknown item '999'")
    refused(post("/users/u1/events", json={"items": [], "dataset_id": dataset["id"]}), 422, "items")
    refused(post("/users/u1/events", json={"items": ["101"], "dataset_id": "nope"}), 404, "dataset 'nope' not found")
    refused(post("/users/u1/events", json={"items": ["101"], "model": "nope"}), 404, "'nope' not found")
    refused(post("/users/u1/events", json={"items": ["101"]}), 422, "exactly one of dataset_id or model")
    refused(post("/users/u1/events", json={"items": ["101"], "model": recipe["id"], "dataset_id": dataset["id"]}),
            422, "exactly one")


def test_builtin_source_unreachable_is_503_and_stores_nothing(svc, unchanged, tmp_path, monkeypatch):
    from tests.conftest_services import free_port_number
    from tests.offline_pip import pip_env

    dead = f"http://127.0.0.1:{free_port_number()}/nothing"  # nothing listens: refused at once
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("RECMERGE_ML100K_URL", dead)
    for k, v in pip_env(tmp_path, None).items():  # pip finds no index and no wheel
        monkeypatch.setenv(k, v)
    refused(svc.client.post("/datasets", json={"name": "x", "source": "ml-100k"}), 503, "could not download ml-100k")
