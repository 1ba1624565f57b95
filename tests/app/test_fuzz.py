"""Property-based fuzz of the OpenAPI schema over every operation: whatever a client sends, no 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from app.main import create_app
from tests.app.conftest import checkpoint_bytes, interactions_csv, make_settings


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    # A tiny stand-in for the cached ml-100k download, so a fuzzed POST {"source": "ml-100k"} is fast
    # and offline: u.data is `user<TAB>item<TAB>rating<TAB>ts`.
    cache = root / "xdg" / "recmerge" / "ml-100k"
    cache.mkdir(parents=True)
    cache.joinpath("u.data").write_text("".join(f"{u}\t{i}\t5\t{u * 100 + i}\n" for u in range(1, 9)
                                                for i in range(1, 12)))
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(root / "xdg"))
    app = create_app(make_settings(root / "svc", MAX_UPLOAD_BYTES=1 << 20), jobs=False)
    with TestClient(app) as client:
        # Something to find: a dataset, a model and an alias, so fuzzed ids can also hit real rows.
        d = client.post("/datasets", data={"name": "d"}, files={"file": ("i.csv", interactions_csv())}).json()
        m = client.post("/recipes", data={"name": "m", "dataset_id": d["id"]},
                        files={"file": ("m.safetensors", checkpoint_bytes(root, d["fingerprint"], d["n_items"]))})
        client.put("/aliases/production", json={"model_id": m.json()["id"]})
        yield app
    mp.undo()


def fuzz(op, mode: GenerationMode, failures: list[str]) -> None:
    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=10, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def no_5xx(case):
        response = case.call()
        if response.status_code >= 500:
            failures.append(f"{op.label} [{mode.value}]: {response.status_code} {response.text[:200]}")

    try:
        no_5xx()
    except Unsatisfiable:
        # Nothing to make invalid (an operation without parameters or body).
        assert mode is GenerationMode.NEGATIVE, op.label


def test_no_server_errors(fuzz_app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15  # every route of the API is in the schema, so every route is fuzzed
    failures: list[str] = []
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(op, mode, failures)
    assert not failures, "\n".join(failures[:20])
