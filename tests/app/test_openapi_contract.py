"""The OpenAPI document tells the truth: every refusal has the one error body and its status documented on
the route, cross-field rules are in the request schemas, 405 lists every method of the path, and the
built-in download answers a documented 503 when offline. (tests/app/test_fuzz.py runs schemathesis.)"""

from __future__ import annotations

import json
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


def _request_schema(doc: dict, path: str, media_type: str = "application/json") -> dict:
    return _resolve(doc, doc["paths"][path]["post"]["requestBody"]["content"][media_type]["schema"])


def test_cross_field_rules_are_in_the_request_schemas(client):
    """What the service refuses by the rules between fields the schema refuses too, and what the schema
    allows the service takes as far as the ids it names (404: they do not exist here)."""
    doc = client.get("/openapi.json").json()
    merge, train = _request_schema(doc, "/merge-jobs"), _request_schema(doc, "/train-jobs")
    merge_yaml = _request_schema(doc, "/merge-jobs", "application/yaml")
    events = _request_schema(doc, "/users/{user}/events")
    refused_by_both = [
        ("/merge-jobs", merge, {"method": "weighted", "model_ids": ["a"], "weights": []}),
        ("/merge-jobs", merge, {"method": "weighted", "model_ids": ["a", "b"], "weights": [0, 0]}),  # all zero
        ("/merge-jobs", merge, {"method": "uniform", "model_ids": ["a", "a"]}),  # a model twice
        ("/merge-jobs", merge, {"method": "uniform", "model_ids": ["a"], "weights": [1.0]}),  # takes no weights
        ("/merge-jobs", merge, {"method": "ties", "model_ids": ["a"]}),  # task vectors need a base
        ("/merge-jobs", merge, {"method": "uniform", "model_ids": ["a"], "base_model_id": "b"}),
        ("/merge-jobs", merge, {"method": "uniform", "model_ids": ["a"], "fisher": {"sampling": "exact"}}),
        ("/merge-jobs", merge, {"method": "fisher", "model_ids": ["a"], "fisher": {"sampling": "topk"}}),  # no n
        ("/merge-jobs", merge, {"method": "fisher", "model_ids": ["a"], "fisher": {"sampling": "exact", "n": 3}}),
        ("/merge-jobs", merge, {"method": "ties", "model_ids": ["a"], "base_model_id": "b",
                                "options": {"density": 3}}),
        ("/merge-jobs", merge, {"method": "weight-search", "model_ids": ["a"]}),  # an average needs two
        ("/merge-jobs", merge, {"method": "weight-search", "model_ids": ["a", "b"],
                                "options": {"combine": "task-vectors"}}),  # task vectors need a base
        ("/merge-jobs", merge, {"method": "no-such-method", "model_ids": ["a"]}),
        ("/merge-jobs", merge, {"merge_method": "ties", "models": [{"model": "a"}]}),  # config: base needed
        ("/merge-jobs", merge, {"merge_method": "weighted", "models": [{"model": "a", "parameters": {"weight": 0}}]}),
        ("/merge-jobs", merge, {"merge_method": "uniform", "models": [{"model": "a"}], "dataset": "data/x"}),
        ("/train-jobs", train, {"dataset_id": "d", "recipe": "duorec", "options": {"no_such_option": 1}}),
        ("/train-jobs", train, {"dataset_id": "d", "recipe": "bert4rec", "options": {"cl_weight": 0.1}}),
        ("/train-jobs", train, {"dataset_id": "d", "recipe": "no-such-recipe"}),
        ("/train-jobs", train, {"dataset_id": "d", "epochs": True}),  # JSON booleans are not numbers
        ("/users/u1/events", events, {"items": ["1"]}),  # the dataset named exactly once
        ("/users/u1/events", events, {"items": ["1"], "dataset_id": "d", "model": "m"}),
    ]
    for path, schema, body in refused_by_both:
        assert not jsonschema.Draft202012Validator(schema).is_valid(body), body
        r = client.post(path, json=body, headers=AUTH)
        assert r.status_code == 422, (body, r.text)
    no_base = {"merge_method": "ties", "models": [{"model": "a"}]}
    assert not jsonschema.Draft202012Validator(merge_yaml).is_valid(no_base)
    accepted_by_schema = [
        ("/merge-jobs", merge, {"method": "weighted", "model_ids": ["a", "b"], "weights": [1.0, 0]}),
        ("/merge-jobs", merge, {"method": "ties", "model_ids": ["a"], "base_model_id": "b",
                                "options": {"density": 0.3}}),
        ("/merge-jobs", merge, {"method": "fisher", "model_ids": ["a", "b"], "fisher": {"sampling": "topk", "n": 3}}),
        ("/merge-jobs", merge, {"method": "weight-search", "model_ids": ["a", "b"]}),
        ("/merge-jobs", merge, {"method": "weight-search", "model_ids": ["a"], "base_model_id": "b",
                                "options": {"combine": "task-vectors", "low": -1, "high": 2}}),
        ("/merge-jobs", merge, {"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": 2}}],
                                "base_model": "b", "name": "job fields beside a config"}),
        ("/train-jobs", train, {"dataset_id": "d", "heads": 3, "hidden": 48}),
        ("/train-jobs", train, {"dataset_id": "d", "recipe": "duorec", "options": {"cl_weight": 0.1}}),
        ("/users/u1/events", events, {"items": ["1"], "model": "m"}),
    ]
    for path, schema, body in accepted_by_schema:
        assert jsonschema.Draft202012Validator(schema).is_valid(body), body
        r = client.post(path, json=body, headers=AUTH)
        assert r.status_code == 404, (body, r.text)  # valid in form: refused only because the ids do not exist


def test_security_is_documented_for_the_doors_that_have_a_token(tmp_path):
    def doc(**tokens) -> dict:
        app = create_app(make_settings(tmp_path / str(len(tokens)), **tokens), jobs=False)
        return app.openapi()

    def guarded(d: dict, method: str, path: str) -> bool:
        op = d["paths"][path][method]
        assert ("security" in op) == ("401" in op["responses"]), (method, path)  # a 401 only behind a token
        return "security" in op

    write_only = doc(API_TOKEN=TOKEN)
    assert guarded(write_only, "post", "/merge-jobs") and not guarded(write_only, "get", "/datasets")
    assert not guarded(write_only, "get", "/recommend/{user}") and not guarded(write_only, "get", "/healthz")
    closed = doc(API_TOKEN=TOKEN, READ_TOKEN="r", RECOMMEND_TOKEN="c")
    assert guarded(closed, "get", "/datasets") and guarded(closed, "get", "/recommend/{user}")
    assert not guarded(closed, "get", "/healthz")
    open_ = doc()
    assert not any(guarded(open_, m, p) for p, item in open_["paths"].items() for m in item)


def test_form_fields_are_never_null_and_unreadable_bodies_are_422(client):
    doc = client.get("/openapi.json").json()
    form = _request_schema(doc, "/datasets", "multipart/form-data")
    assert all("null" not in json.dumps(prop) for prop in form["properties"].values()), form  # left out, not null
    r = client.post("/recommend", content=b"\xff\xfe{", headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body"], r.text
    jsonschema.validate(r.json(), _error_schema(doc, "/recommend", "post", 422))
