"""The end-to-end flow of tests/e2e against a running deployment (deploy/check.sh): dataset upload, a
training job, a recipe trained here and registered by upload, a Fisher merge job, recommendations from
the merged model and through an alias; then the dashboard's pages and the card of the merged model.

    python deploy/e2e.py --url http://127.0.0.1:18000 --token TOKEN
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e import flow  # noqa: E402

# The test-suite's 45 s per job assumes a warm native worker; a container on a loaded 2-core machine
# imports torch and starts its first job far slower, and a slow job is not what this check is about.
JOB_TIMEOUT_S = 600.0


def _patient_wait_job(client, path, timeout=JOB_TIMEOUT_S, **kw):
    return _wait_job(client, path, timeout=max(timeout, JOB_TIMEOUT_S), **kw)


_wait_job = flow.wait_job
flow.wait_job = _patient_wait_job


def _log(response: httpx.Response) -> None:
    if response.request.method == "GET" and response.request.url.path.startswith("/jobs/"):
        return  # polling: one line per poll would drown the flow
    if response.request.method == "GET" and response.request.url.path.startswith("/merge-jobs/"):
        return
    elapsed = time.monotonic() - response.request.extensions["t0"]
    print(f"    {response.request.method} {response.request.url.path} -> {response.status_code} "
          f"({elapsed:.2f} s)", flush=True)


def _stamp(request: httpx.Request) -> None:
    request.extensions["t0"] = time.monotonic()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", required=True)
    args = ap.parse_args()
    headers = {"Authorization": f"Bearer {args.token}"}
    with httpx.Client(base_url=args.url, headers=headers, timeout=120.0,
                      event_hooks={"request": [_stamp], "response": [_log]}) as client:
        flow.ok(client.get("/healthz"))
        start = time.monotonic()
        with tempfile.TemporaryDirectory() as tmp:
            flow.run_flow(client, Path(tmp))
        print(f"    flow: dataset, training job, uploaded recipe, fisher merge job (twice), recommendations, "
              f"alias swap: {time.monotonic() - start:.1f} s", flush=True)

        merged = flow.ok(client.get("/models", params={"kind": "merged"}))[0]["id"]
        card = client.get(f"/models/{merged}/card")
        assert card.status_code == 200 and card.text.lstrip().startswith("#"), (card.status_code, card.text[:200])
        # The dashboard's templates and static files are package data: a wheel without them fails here.
        for path in ("/ui", "/ui/models", f"/ui/part/models/{merged}", "/ui/static/dashboard.js", "/docs"):
            r = client.get(path)
            assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text[:200]}"
    return 0


if __name__ == "__main__":
    sys.exit(main())
