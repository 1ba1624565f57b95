"""`make demo`: the whole pipeline through the REST API on embedded defaults, in a few minutes on 2 cores.

    prepare ml-100k -> train a base BERT4Rec -> fine-tune each registered recipe from it -> Fisher merge
    -> the merged model's metrics beside its ingredients -> recommendations for two users

Everything goes over real HTTP to the app a user would run (`recmerge serve`): SQLite, a local store and
the in-process job runner under ./.recmerge-demo. ml-100k comes from ../shared/data when the checkout has
it, else it is downloaded like any user's would be (GroupLens, else the recbole wheel through pip);
`--download` ignores the checkout's copy and downloads into an empty cache, as on a fresh clone.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCAL_ML100K = ROOT.parent / "shared" / "data" / "ml-100k"
SMALL = {"hidden": 32, "layers": 2, "heads": 2, "inner": 64, "max_len": 50, "batch_size": 128, "patience": 0}
METRICS = [("valid", "ndcg@10"), ("test", "ndcg@10"), ("test", "hr@10"), ("test", "mrr")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(settings):
    """The embedded app on a loopback port, in a thread of this process."""
    import uvicorn

    from app.main import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="demo-api", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit("demo: the API did not start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def _ok(r, status=200):
    if r.status_code != status:
        raise SystemExit(f"demo: {r.request.method} {r.request.url.path} answered {r.status_code}: {r.text}")
    return r.json()


def _bar(fraction: float, width: int = 24) -> str:
    n = int(round(width * max(0.0, min(1.0, fraction))))
    return "#" * n + "." * (width - n)


def _wait(client, path: str, label: str) -> dict:
    """Poll a job, printing its progress on one line; children (Fishers, evaluations) after it."""
    last = ""
    while True:
        job = _ok(client.get(path))
        p = job["progress"]
        line = f"  {label:<28} [{_bar(p['fraction'])}] {job['status']:<9} {p['stage'] or ''}"
        kids = job.get("children") or []
        if kids and job["status"] == "queued":
            done = sum(k["status"] == "succeeded" for k in kids)
            running = [f"{k['kind']} {k['progress']['fraction']:.0%}" for k in kids if k["status"] == "running"]
            line += f"  ({done}/{len(kids)} sub-jobs done{'; ' + ', '.join(running) if running else ''})"
        if line != last:
            print("\r" + line[:150].ljust(150), end="", flush=True)
            last = line
        if job["status"] in ("succeeded", "failed", "cancelled"):
            print()
            if job["status"] != "succeeded":
                raise SystemExit(f"demo: {label} {job['status']}: {job['error']}")
            return job
        time.sleep(0.5)


def _train(client, body: dict, label: str) -> str:
    job = _ok(client.post("/train-jobs", json=body), 202)
    return _wait(client, f"/jobs/{job['id']}", label)["result"]["model_id"]


def _table(rows: list[tuple[str, dict | None]]) -> str:
    width = max(len(name) for name, _ in rows) + 2
    out = [f"{'model':<{width}}" + "".join(f"{s + ' ' + m:>15}" for s, m in METRICS)]
    for name, metrics in rows:
        cells = []
        for split, metric in METRICS:
            v = ((metrics or {}).get(split) or {}).get("full", {}).get(metric)
            cells.append(f"{v:>15.4f}" if v is not None else f"{'-':>15}")
        out.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(out)


def _recipes_to_merge() -> list[tuple[str, dict]]:
    """Every registered recipe other than the base's, fine-tuned from the base. With bert4rec alone,
    two differently seeded and masked bert4rec runs stand in, so there is something to merge."""
    from models.recipes import RECIPES

    others = [name for name in RECIPES if name != "bert4rec"][:3]
    if len(others) >= 2:
        return [(name, {"recipe": name}) for name in others]
    runs = [(name, {"recipe": name}) for name in others]
    runs += [(f"bert4rec-seed{i}", {"recipe": "bert4rec", "seed": i, "options": {"mask_prob": 0.2 + 0.1 * i}})
             for i in range(1, 3 - len(runs) + 1)]
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m app.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default=".recmerge-demo", help="working directory, emptied first")
    ap.add_argument("--base-epochs", type=int, default=8)
    ap.add_argument("--recipe-epochs", type=int, default=3)
    ap.add_argument("--method", default="fisher", help="merge method (default fisher)")
    ap.add_argument("--fisher-users", type=int, default=300, help="estimate Fishers on a subset of this many users")
    ap.add_argument("--download", action="store_true",
                    help="ignore ../shared/data and download ml-100k into an empty cache under --dir")
    ap.add_argument("--keep-serving", action="store_true", help="keep the API and dashboard up until Ctrl-C")
    args = ap.parse_args(argv)

    import httpx

    from core.settings import Settings

    work = Path(args.dir).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if args.download:
        os.environ["XDG_CACHE_HOME"] = str(work / "download-cache")
        print(f"ml-100k: downloading into an empty cache ({work / 'download-cache'})")
    elif (LOCAL_ML100K / "u.data").is_file():
        # The service fetches ml-100k into its download cache; seed that cache from the checkout's copy.
        cache = work / "download-cache" / "recmerge" / "ml-100k"
        cache.mkdir(parents=True)
        for f in ("u.data", "u.item"):
            if (LOCAL_ML100K / f).is_file():
                shutil.copy(LOCAL_ML100K / f, cache / f)
        os.environ["XDG_CACHE_HOME"] = str(work / "download-cache")
        print(f"ml-100k: local copy {LOCAL_ML100K}")
    else:
        print("ml-100k: not in the checkout; the service downloads it")

    settings = Settings(DATA_DIR=work / "service", DATABASE_URL="", STORE_URL="", BROKER_URL=None, API_TOKEN=None)
    t0 = time.perf_counter()
    server, thread, url = _serve(settings)
    print(f"embedded service at {url} (SQLite + local store + in-process jobs under {work})")
    print(f"dashboard: {url}/ui (while the demo runs; API docs at {url}/docs)")
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            ds = _ok(client.post("/datasets", json={"name": "ml-100k", "source": "ml-100k"}), 201)
            print(f"dataset {ds['name']}: {ds['n_users']} users, {ds['n_items']} items, "
                  f"{ds['n_interactions']} interactions")

            common = {"dataset_id": ds["id"], **SMALL}
            print("training (small preset: hidden 32, 2 layers, max_len 50):")
            base = _train(client, {**common, "name": "base bert4rec", "epochs": args.base_epochs}, "base bert4rec")
            # The recipes are queued together: the runner's two threads train two at a time.
            queued = []
            for name, extra in _recipes_to_merge():
                body = {**common, "name": name, "epochs": args.recipe_epochs, "init_model_id": base, **extra}
                queued.append((name, _ok(client.post("/train-jobs", json=body), 202)["id"]))
            ingredients = [_wait(client, f"/jobs/{jid}", f"{name} (from base)")["result"]["model_id"]
                           for name, jid in queued]

            merge = {"method": args.method, "model_ids": ingredients, "evaluate": True, "name": f"{args.method} merge"}
            if args.method == "fisher":
                merge["fisher"] = {"sampling": "model", "n": 8, "max_users": args.fisher_users}
            job = _ok(client.post("/merge-jobs", json=merge), 202)
            print(f"merge job {job['id']} ({len(job['children'])} sub-jobs: "
                  f"{', '.join(sorted(c['kind'] for c in job['children'])) or 'none'}):")
            done = _wait(client, f"/merge-jobs/{job['id']}", f"{args.method} merge")

            base_row = _ok(client.get(f"/models/{base}"))
            rows = [(base_row["name"], base_row["metrics"])]
            rows += [(m["name"], m["metrics"]) for m in done["ingredients"]]
            rows.append((done["merged"]["name"], done["merged"]["metrics"]))
            print("\nfull ranking (all items, history excluded):")
            print(_table(rows))

            merged = done["result_model_id"]
            _ok(client.put("/aliases/production", json={"model_id": merged}))
            for user in ("1", "2"):
                rec = _ok(client.get(f"/recommend/{user}", params={"model": "production", "k": 5}))
                print(f"\nGET /recommend/{user}?model=production&k=5")
                for it in rec["items"]:
                    print(f"  {it['item']:>5}  {it['score']:7.3f}  {it['title'] or ''}")
        if args.keep_serving:
            print(f"\ndashboard: {url}/ui - serving until Ctrl-C")
            try:
                thread.join()
            except KeyboardInterrupt:
                pass
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    print(f"\ndone in {time.perf_counter() - t0:.0f} s; state kept in {work}")
    print(f"to browse it again: RECMERGE_DATA_DIR={work / 'service'} {ROOT / '.venv/bin/recmerge'} serve --port 8000, "
          f"then open http://127.0.0.1:8000/ui")
    return 0


if __name__ == "__main__":
    sys.exit(main())
