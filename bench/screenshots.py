"""Screenshots of every dashboard page for the README: an embedded service on a small dataset with titles,
three uploaded recipes, a Fisher merge scored beside them, then each page in headless chromium.

    .venv/bin/python -m bench.screenshots            # writes docs/screenshots/*.png
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx

from tests.browser.harness import chromium_path, launch, register_dataset, serve, write_checkpoint, write_titled_source

OUT = Path(__file__).resolve().parents[1] / "docs" / "screenshots"


def populate(base: str, app, tmp: Path) -> dict:
    http = httpx.Client(base_url=base, timeout=300)  # first calls import torch-side modules: slow on a busy machine
    ds = register_dataset(app, write_titled_source(tmp / "films"))
    ids = []
    for k, name in enumerate(["bert4rec-seed0", "bert4rec-seed1", "bert4rec-seed2"]):
        ckpt = write_checkpoint(tmp / f"{name}.safetensors", ds["fingerprint"], ds["n_items"], seed=k)
        r = http.post("/recipes", data={"name": name, "dataset_id": ds["id"]}, files={"file": ckpt.open("rb")})
        r.raise_for_status()
        ids.append(r.json()["id"])
    r = http.post("/merge-jobs", json={"method": "fisher", "model_ids": ids, "name": "fisher soup",
                                               "fisher": {"sampling": "topk", "n": 5}})
    r.raise_for_status()
    job = r.json()["id"]
    end = time.monotonic() + 600
    while (state := http.get(f"/merge-jobs/{job}").json())["status"] not in ("succeeded", "failed"):
        if time.monotonic() > end:
            raise SystemExit("the merge did not finish in 10 minutes")
        time.sleep(0.5)
    if state["status"] != "succeeded":
        raise SystemExit(f"the merge failed: {state['error']}")
    return {"job": job, "model": state["result_model_id"]}


def shoot(base: str, made: dict, out: Path) -> list[Path]:
    from playwright.sync_api import expect, sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1280, "height": 860})

        def take(name: str, path: str, ready: str = "#part h1", before=None) -> None:
            page.goto(base + path)
            expect(page.locator(ready).first).to_be_visible(timeout=60_000)
            if before:
                before()
            shots.append(out / f"{name}.png")
            page.screenshot(path=shots[-1], full_page=True)

        def figures_drawn() -> None:
            page.wait_for_function("[...document.querySelectorAll('img[data-src]')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)", timeout=600_000)

        def recommend() -> None:
            page.locator("input[name=user]").fill("7")
            page.get_by_role("button", name="Recommend").click()
            expect(page.locator("#recommendations tbody tr")).to_have_count(10)

        def field_error() -> None:
            page.locator("select[name='fisher.sampling']").select_option("topk")
            page.locator("input[name='fisher.n']").fill("")
            page.get_by_role("button", name="Start merge").click()
            expect(page.locator("[data-field=fisher] > .field-error")).to_be_visible()

        take("overview", "/ui")
        take("datasets", "/ui/datasets")
        take("models", "/ui/models")
        take("model", f"/ui/models/{made['model']}", before=figures_drawn)
        take("jobs", "/ui/jobs")
        take("job", f"/ui/jobs/{made['job']}")
        take("merge", "/ui/merge", before=field_error)
        take("recommend", f"/ui/recommend?model={made['model']}", before=recommend)
        browser.close()
    return shots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    if chromium_path() is None:
        raise SystemExit("chromium is not installed (make sysdeps)")
    with tempfile.TemporaryDirectory() as tmp, serve(Path(tmp) / "svc") as (base, app):
        made = populate(base, app, Path(tmp))
        for path in shoot(base, made, args.out):
            print(path)


if __name__ == "__main__":
    main()
