"""schemathesis with every one of its checks over every operation of the OpenAPI document, against the
embedded service (SQLite, in-process) with its write and read tokens set: status codes, content types,
headers and bodies as documented, schema-valid requests accepted, schema-invalid ones refused, tokens
enforced, a created resource found and a deleted one gone. Any failure of any check fails the test."""

from __future__ import annotations

import os
import time

import pytest
import schemathesis
from fastapi.testclient import TestClient
from schemathesis.config import SchemathesisConfig
from schemathesis.config._checks import ChecksConfig
from schemathesis.engine import Status, events, from_schema

from app.main import create_app
from tests.app.conftest import TOKEN, checkpoint_bytes, interactions_csv, make_settings

READ_TOKEN = "read-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Cases per operation and phase: enough for each check to meet each operation, bounded so that the
# whole run stays near a minute on two busy cores.
MAX_EXAMPLES = int(os.environ.get("RECMERGE_FUZZ_EXAMPLES", "5"))
# Every check this schemathesis has: its configurable ones (max_response_time only acts with a limit).
ALL_CHECKS = sorted(name for name in ChecksConfig.__dataclass_fields__
                    if not name.startswith("_") and name != "max_response_time")

# The content of an uploaded file decides whether it can be used: an interactions table must parse and
# keep users after the min_user/min_item filters, a checkpoint must be safetensors whose header agrees
# with its tensors and with the dataset it names. No JSON Schema says that of a `format: binary` part
# (nor of the filters against the built-in data), so for these two operations a schema-valid request may
# also be refused for its file with the documented 400 (not a checkpoint) or 422 (content refused).
# Every other expectation of positive_data_acceptance holds there too.
UPLOAD_REFUSALS = ["2xx", "3xx", "400", "401", "403", "404", "409", "422", "429", "5xx"]


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
    app = create_app(make_settings(root / "svc", MAX_UPLOAD_BYTES=1 << 20, API_TOKEN=TOKEN,
                                   READ_TOKEN=READ_TOKEN), jobs=False)
    with TestClient(app) as client:
        # Something to find: a dataset, a model and an alias, so fuzzed ids can also hit real rows.
        d = client.post("/datasets", data={"name": "d"}, files={"file": ("i.csv", interactions_csv())},
                        headers=AUTH).json()
        m = client.post("/recipes", data={"name": "m", "dataset_id": d["id"]}, headers=AUTH,
                        files={"file": ("m.safetensors", checkpoint_bytes(root, d["fingerprint"], d["n_items"]))})
        client.put("/aliases/production", json={"model_id": m.json()["id"]}, headers=AUTH)
        yield app
    mp.undo()


def _described_rules(context, case):
    """Positive cases also keep the rules the document states in words (app/api/document.py): as many
    weights as models, a model listed once, heads dividing hidden, a search interval's low below its high.
    JSON Schema can say them only value by value, which no generator draws from in time; the service
    refuses them with 422, which tests/app/test_openapi_contract.py checks."""
    body = case.body
    if case.meta is None or not case.meta.generation.mode.is_positive or not isinstance(body, dict):
        return case
    if isinstance(body.get("model_ids"), list) and isinstance(body.get("weights"), list):
        n = len(body["model_ids"])
        weights = (body["weights"] + [1.0] * n)[:n]
        body["weights"] = weights if any(w > 0 for w in weights) else [1.0] + weights[1:]
    if isinstance(body.get("models"), list):
        models = [dict(e) if isinstance(e, dict) else e for e in body["models"]]
        seen: set = set()
        for i, entry in enumerate(models):  # a model listed twice gets a name of its own, the count stays
            if isinstance(entry, dict) and entry.get("model") in seen:
                entry["model"] = f"{entry['model']}~{i}"
            seen.add(entry.get("model") if isinstance(entry, dict) else None)
        body["models"] = models
    for options in (body.get("options"), body.get("parameters")):  # weight-search over task vectors
        if isinstance(options, dict) and options.get("combine") == "task-vectors":
            low, high = options.get("low", 0.0), options.get("high", 1.0)
            if isinstance(low, int | float) and isinstance(high, int | float) and not low < high:
                options["low"], options["high"] = (low, low + 1.0) if abs(low) < 1e300 else (-1.0, 1.0)
    if "heads" in body or "hidden" in body:
        heads, hidden = body.get("heads", 1), body.get("hidden", 64)
        if isinstance(heads, int) and isinstance(hidden, int) and heads > 0 and hidden % heads:
            body["hidden"] = heads * max(1, hidden // heads)
    return case


def run_schemathesis(app, *, max_examples: int, operations: list[dict] | None = None,
                     phases: dict | None = None) -> dict:
    """Every phase and every check of one schemathesis run; returns what ran and what failed."""
    config = SchemathesisConfig.from_dict({
        "seed": 20261207,  # one run is the same run on every machine
        "checks": {"enabled": True},
        "generation": {"mode": "all", "max-examples": max_examples},
        "auth": {"openapi": {"HTTPBearer": {"bearer": TOKEN}}},
        "phases": {"stateful": {"max-steps": 8}, **(phases or {})},
        "operations": operations or [],
    })
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    schema.hook("map_case")(_described_rules)
    ran = {"cases": 0, "checks": set(), "operations": set(), "failures": [], "errors": []}
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            ran["cases"] += len(event.recorder.cases)
            for node in event.recorder.cases.values():
                ran["operations"].add(node.value.operation.label)
            for case_id, checks in event.recorder.checks.items():
                for check in checks:
                    ran["checks"].add(check.name)
                    if check.status == Status.FAILURE and check.failure_info is not None:
                        failure = check.failure_info.failure
                        interaction = event.recorder.interactions.get(case_id)
                        got = interaction.response if interaction is not None else None
                        answer = f"{got.status_code} {got.content[:300]!r}" if got is not None else "-"
                        ran["failures"].append(f"[{event.phase.value}] {event.recorder.label}: {check.name}: "
                                               f"{failure.title}: {failure.message[:300]}\n  answered {answer}\n  "
                                               f"{check.failure_info.code_sample[:500]}")
        elif isinstance(event, events.NonFatalError):
            ran["errors"].append(f"{event.label}: {event.info.title}: {event.info.message[:500]}")
        elif isinstance(event, events.FatalError):
            ran["errors"].append(f"fatal: {event.exception!r}")
    return ran


def test_every_check_over_every_operation_passes(fuzz_app):
    upload_refusals = [{"include-path": path, "include-method": "POST",
                        "checks": {"positive_data_acceptance": {"expected-statuses": UPLOAD_REFUSALS}}}
                       for path in ("/datasets", "/recipes")]
    started = time.monotonic()
    ran = run_schemathesis(fuzz_app, max_examples=MAX_EXAMPLES, operations=upload_refusals)
    took = time.monotonic() - started
    documented = {f"{method.upper()} {path}" for path, item in fuzz_app.openapi()["paths"].items()
                  for method in item}
    assert len(documented) >= 24  # every route of the API is in the document...
    assert ran["operations"] >= documented, sorted(documented - ran["operations"])  # ...and was called
    assert ran["checks"] == set(ALL_CHECKS), sorted(set(ALL_CHECKS) ^ ran["checks"])
    assert not ran["errors"], "\n".join(ran["errors"][:10])
    assert not ran["failures"], f"{len(ran['failures'])} failures in {ran['cases']} cases:\n" + "\n".join(
        list(dict.fromkeys(ran["failures"]))[:15])
    print(f"schemathesis: {ran['cases']} cases, {len(ran['checks'])} checks, {len(ran['operations'])} "
          f"operations, no failures, {took:.0f} s")


def test_the_run_reports_a_document_that_lies(fuzz_app):
    """The harness above can fail: the same run over one operation whose document leaves out the 404 it
    answers for an unknown id reports status_code_conformance."""
    doc = fuzz_app.openapi()
    answer = doc["paths"]["/datasets/{dataset_id}"]["get"]["responses"].pop("404")
    try:
        ran = run_schemathesis(fuzz_app, max_examples=3, phases={"stateful": {"enabled": False}},
                               operations=[{"exclude-path": "/datasets/{dataset_id}", "enabled": False}])
    finally:
        doc["paths"]["/datasets/{dataset_id}"]["get"]["responses"]["404"] = answer
    assert any("status_code_conformance" in f and "404" in f for f in ran["failures"]), ran["failures"][:5]
