"""Tokens checked before a body is read, the optional read and recommend tokens, strict multipart forms,
the recipe form field, upload scratch, and error messages that name inputs and show no server path."""

from __future__ import annotations

import fcntl
import io
import json
import os

import pytest

from app.main import create_app
from app.services.uploads import LOCK_NAME, saved_upload
from tests.app.conftest import TOKEN, checkpoint_bytes, interactions_csv, make_settings, multipart_stream

READ, RECO = "read-token", "recommend-token"


def _counting(n_chunks: int, size: int = 1 << 20):
    pulled = []

    def chunks():
        for i in range(n_chunks):
            pulled.append(i)
            yield b"\0" * size

    return chunks(), pulled


@pytest.mark.parametrize("url, fields", [("/recipes", {"name": "r", "dataset_id": "d"}), ("/datasets", {"name": "x"})])
def test_a_write_without_the_token_is_refused_before_its_body_is_read(make_service, url, fields):
    svc = make_service(token=TOKEN)
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        chunks, pulled = _counting(32)
        body, ctype = multipart_stream(fields, "big.safetensors", chunks)
        r = svc.client.post(url, content=body, headers={"content-type": ctype, **headers})
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"] == "Bearer"
        assert len(pulled) == 0  # not one chunk of the 32 MiB file was asked for
    # With the token the same body is read (and refused for what it is).
    chunks, pulled = _counting(4)
    body, ctype = multipart_stream(fields, "big.safetensors", chunks)
    r = svc.client.post(url, content=body, headers={"content-type": ctype, **svc.headers})
    assert r.status_code in (400, 404, 422) and len(pulled) == 4


def test_read_and_recommend_tokens(make_service, tmp_path):
    svc = make_service(token=TOKEN, READ_TOKEN=READ, RECOMMEND_TOKEN=RECO)
    d = svc.upload_dataset()
    r = svc.upload_recipe(checkpoint_bytes(tmp_path, d["fingerprint"], d["n_items"]), d["id"])
    assert r.status_code == 201, r.text
    m = r.json()["id"]
    reads = ["/datasets", f"/datasets/{d['id']}", "/recipes", f"/recipes/{m}", "/models", f"/models/{m}",
             f"/models/{m}/file", "/aliases", "/metrics", "/merge-jobs/nope", "/jobs/nope"]
    bearer = {t: {"Authorization": f"Bearer {t}"} for t in (TOKEN, READ, RECO, "wrong")}
    for url in reads:
        for headers in ({}, bearer[RECO], bearer["wrong"]):
            assert svc.client.get(url, headers=headers).status_code == 401, (url, headers)
        for token in (READ, TOKEN):  # the read token, or the stronger API token
            assert svc.client.get(url, headers=bearer[token]).status_code in (200, 404), (url, token)
    for call in (lambda h: svc.client.get("/recommend/u1", params={"model": m, "k": 2}, headers=h),
                 lambda h: svc.client.post("/recommend", json={"model": m, "items": ["101"], "k": 2}, headers=h)):
        assert call({}).status_code == 401
        assert call(bearer["wrong"]).status_code == 401
        for token in (RECO, READ, TOKEN):
            assert call(bearer[token]).status_code == 200, token
    # The read token opens no write; probes stay open.
    assert svc.client.put("/aliases/p", json={"model_id": m}, headers=bearer[READ]).status_code == 401
    assert svc.client.get("/healthz").status_code == 200


def test_recommend_stays_open_when_only_reads_are_protected(make_service, tmp_path):
    svc = make_service(READ_TOKEN=READ)
    d = svc.upload_dataset()
    m = svc.upload_recipe(checkpoint_bytes(tmp_path, d["fingerprint"], d["n_items"]), d["id"]).json()["id"]
    assert svc.client.get("/models").status_code == 401
    assert svc.client.get("/recommend/u1", params={"model": m, "k": 2}).status_code == 200


def test_unknown_form_fields_are_refused_like_unknown_json_fields(svc, dataset, tmp_path):
    before = svc.snapshot()
    r = svc.client.post("/datasets", data={"name": "x", "bogus": "1"},
                        files={"file": ("i.csv", io.BytesIO(interactions_csv(seed=3)))})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "bogus"], r.text
    assert r.json()["errors"][0]["type"] == "extra_forbidden"
    good = checkpoint_bytes(tmp_path, dataset["fingerprint"], dataset["n_items"])
    r = svc.upload_recipe(good, dataset["id"], bogus="1")
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "bogus"], r.text
    r = svc.client.post("/recipes", data={"name": "r", "dataset_id": dataset["id"]},
                        files={"file": ("r.safetensors", io.BytesIO(good)), "extra": ("e.bin", io.BytesIO(b"x"))})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "extra"], r.text
    assert svc.snapshot() == before


@pytest.mark.parametrize("recipe, needles", [
    ({"name": "bert4rec", "bogus": 1}, ["recipe", "bogus", "not an option"]),
    ({"name": "no-such-recipe"}, ["recipe", "unknown recipe 'no-such-recipe'"]),
    ({"options": {}}, ["recipe", "needs a 'name'"]),
    ({"name": "duorec"}, ["recipe", "name=\"duorec\" in the form", "r.safetensors's header says \"bert4rec\""]),
])
def test_the_recipe_field_is_validated_by_the_registry_and_the_header(svc, dataset, tmp_path, recipe, needles):
    before = svc.snapshot()
    good = checkpoint_bytes(tmp_path, dataset["fingerprint"], dataset["n_items"])
    r = svc.upload_recipe(good, dataset["id"], recipe=json.dumps(recipe))
    assert r.status_code == 422, r.text
    for needle in needles:
        assert needle in r.json()["detail"], r.json()["detail"]
    assert svc.snapshot() == before


def test_stale_upload_scratch_is_swept_at_start_up_and_live_uploads_are_kept(tmp_path):
    settings = make_settings(tmp_path / "svc")
    settings.tmp_dir.mkdir(parents=True)
    dead = settings.tmp_dir / "upload-dead"  # its process was killed: nobody holds the lock
    dead.mkdir()
    (dead / LOCK_NAME).touch()
    (dead / "half.safetensors").write_bytes(b"x" * 100)
    live = settings.tmp_dir / "upload-live"
    live.mkdir()
    fd = os.open(live / LOCK_NAME, os.O_CREAT | os.O_WRONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        create_app(settings, jobs=False)
        assert not dead.exists()
        assert live.exists()
    finally:
        os.close(fd)


def test_upload_scratch_is_removed_on_error_and_on_a_failed_copy(tmp_path):
    with pytest.raises(RuntimeError):
        with saved_upload(io.BytesIO(b"abc"), "f.csv", tmp_path) as up:
            assert up.path.read_bytes() == b"abc"
            raise RuntimeError("the request was cancelled")

    class Broken(io.BytesIO):
        def read(self, n=-1):
            raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        with saved_upload(Broken(), "f.csv", tmp_path):
            pass
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content", [
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR secret-bytes",
    b"PK\x03\x04" + b"\x00" * 40 + b"zip-secret",
    b"user,item,ts\n\x7fELF-secret,1,2\n",
])
def test_a_binary_dataset_upload_is_refused_without_echoing_its_bytes(svc, content):
    before = svc.snapshot()
    r = svc.client.post("/datasets", data={"name": "x"}, files={"file": ("img.csv", io.BytesIO(content))})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("img.csv: not a text file")
    assert "secret" not in r.text and "PNG" not in r.text and "\\u0000" not in r.text
    assert svc.snapshot() == before


def test_no_file_error_shows_a_server_path_and_each_names_its_upload(svc, dataset, tmp_path):
    """Every refusal of a file-taking route: message names the client's file, never DATA_DIR or scratch."""
    good = checkpoint_bytes(tmp_path, dataset["fingerprint"], dataset["n_items"])
    foreign = good.replace(b'"format":"recmerge/1"', b'"format":"recmerge/X"', 1)
    recipe_files = [good[:5], good[:-100], b"PK\x03\x04 zip", foreign,
                    checkpoint_bytes(tmp_path, "f" * 64, dataset["n_items"]),
                    checkpoint_bytes(tmp_path, dataset["fingerprint"], dataset["n_items"] + 1)]
    root = str(svc.app.state.settings.DATA_DIR)
    for content in recipe_files:
        r = svc.upload_recipe(content, dataset["id"], filename="client-name.safetensors")
        assert r.status_code in (400, 422), r.text
        assert root not in r.text and "upload-" not in r.text
        assert r.json()["detail"].startswith("client-name.safetensors"), r.text
    for content in (b"", b"who,what\na,b\n", b"user,item,ts\nu1,1,x\n"):
        r = svc.client.post("/datasets", data={"name": "x"}, files={"file": ("client.csv", io.BytesIO(content))})
        assert r.status_code == 422 and root not in r.text and "upload-" not in r.text, r.text
        assert r.json()["detail"].startswith("client.csv"), r.text
