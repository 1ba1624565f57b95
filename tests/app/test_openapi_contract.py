"""The OpenAPI document tells the truth: every refusal has the one error body and its status documented on
the route, cross-field rules are in the request schemas, 405 lists every method of the path, and the
built-in download answers a documented 503 when offline. (tests/app/test_fuzz.py runs schemathesis.)"""

from __future__ import annotations

import socket

import jsonschema
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from models.errors import DataError
from tests.app.conftest import TOKEN, make_settings

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(tmp_path):
    app = create_app(make_settings(tmp_path / "svc", API_TOKEN=TOKEN, MAX_UPLOAD_BYTES=1000), jobs=False)
    with TestClient(app) as c:
        yield c


def _resolve(doc: dict, node):
    if isinstance(node, dict):
        if "$ref" in node:
            name = node["$ref"].removeprefix("#/components/schemas/")
            return _resolve(doc, doc["components"]["schemas"][name])
        return {k: _resolve(doc, v) for k, v in node.items()}
    return [_resolve(doc, v) for v in node] if isinstance(node, list) else node


def _error_schema(doc, path, method, status) -> dict:
    responses = doc["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path}: {status} is not documented ({sorted(responses)})"
    return _resolve(doc, responses[str(status)]["content"]["application/json"]["schema"])


def test_every_refusal_has_the_documented_error_body(client):
    doc = client.get("/openapi.json").json()
    cases = [
        ("post", "/train-jobs", dict(json={"dataset_id": "d"}), 401),  # no token
        ("get", "/datasets/{dataset_id}", dict(url="/datasets/nope"), 404),
        ("post", "/datasets", dict(content=b"x", headers={**AUTH, "content-type": "text/plain"}), 415),
        ("post", "/datasets", dict(content=b"x" * 2000, headers={**AUTH, "content-type": "application/json"}), 413),
        ("post", "/train-jobs", dict(json={"dataset_id": "d", "epochs": 0}, headers=AUTH), 422),  # FastAPI's own
        ("post", "/merge-jobs", dict(json={"method": "uniform", "model_ids": ["a"], "weights": [1, 2]},
                                     headers=AUTH), 422),  # a route's own validation
        ("get", "/recommend/{user}", dict(url="/recommend/u1?model=nope"), 404),
    ]
    for method, path, kw, status in cases:
        url = kw.pop("url", path)
        r = client.request(method, url, **kw)
        assert r.status_code == status, (path, r.text)
        body = r.json()
        jsonschema.validate(body, _error_schema(doc, path, method, status))
        assert isinstance(body["detail"], str) and body["detail"], body
        if status == 422:  # the fields at fault, and the one line names them
            assert body["errors"] and all(e["loc"] and e["msg"] for e in body["errors"]), body
            assert body["errors"][0]["loc"][-1] in body["detail"] or "weights" in body["detail"], body
    assert r.json()["errors"] == []  # not a field's problem: no field errors
    # The error body is one component, the same for every status of every route.
    refs = {str(resp["content"]["application/json"]["schema"])
            for item in doc["paths"].values() for op in item.values()
            for status, resp in op["responses"].items() if int(status) >= 400}
    assert refs == {"{'$ref': '#/components/schemas/ErrorBody'}"}


def test_a_405_lists_every_method_of_the_path(client):
    r = client.post("/merge-jobs/some-id", headers=AUTH)  # GET and DELETE are two routes of this path
    assert r.status_code == 405
    assert {m.strip() for m in r.headers["allow"].split(",")} == {"GET", "DELETE"}
    assert r.json() == {"detail": "Method Not Allowed", "errors": []}
    r = client.delete("/datasets")
    assert {m.strip() for m in r.headers["allow"].split(",")} == {"GET", "POST"}


def test_the_builtin_download_answers_a_documented_503_when_offline(client, tmp_path, monkeypatch):
    import models.download

    with socket.socket() as s:  # a port nothing listens on: GroupLens is unreachable
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/ml-100k.zip"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("RECMERGE_ML100K_URL", dead)

    def pip_offline(requirement, dest, extra_args=None):  # what pip says with no index reachable
        raise DataError(f"pip download {requirement} failed (exit 1): ERROR: No matching distribution found")

    monkeypatch.setattr(models.download, "pip_download", pip_offline)
    r = client.post("/datasets", json={"name": "ml", "source": "ml-100k"}, headers=AUTH)
    assert r.status_code == 503, r.text
    assert r.json()["detail"].startswith("could not download ml-100k: GroupLens (" + dead), r.text
    jsonschema.validate(r.json(), _error_schema(client.get("/openapi.json").json(), "/datasets", "post", 503))
    assert client.get("/datasets").json() == []
