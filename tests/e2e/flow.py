"""The user's whole path through the API, shared by the Celery and the embedded end-to-end tests:
dataset upload -> a training job -> a recipe trained elsewhere registered by upload -> a Fisher merge
job -> recommendations from the merged model and from an alias switched between models."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from tests.synthetic import make_planted_dataset

TINY = {"hidden": 16, "layers": 1, "heads": 1, "inner": 32, "max_len": 20, "batch_size": 64, "epochs": 2,
        "patience": 0}
TERMINAL = ("succeeded", "failed", "cancelled")
METHOD = "fisher"


def ok(r: httpx.Response, status: int = 200) -> dict:
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    return r.json()


def wait_job(client: httpx.Client, path: str, timeout: float = 45.0, until=TERMINAL, on_poll=None) -> dict:
    end = time.monotonic() + timeout
    while True:
        job = ok(client.get(path))
        if on_poll:
            on_poll(job)
        if job["status"] in until:
            return job
        if time.monotonic() > end:
            raise AssertionError(f"{path} still {job['status']} ({job['progress']}) after {timeout} s: {job}")
        time.sleep(0.1)


def upload_dataset(client: httpx.Client, tmp: Path, n_users: int = 120) -> tuple[str, object]:
    """(dataset id, the same dataset prepared locally — for training a recipe outside the service)."""
    local = make_planted_dataset(tmp / "raw", n_users=n_users, n_items=30)
    with open(tmp / "raw" / "planted.txt", "rb") as f:
        ds = ok(client.post("/datasets", files={"file": ("planted.txt", f)},
                            data={"name": "planted", "format": "sasrec"}), 201)
    assert ds["fingerprint"] == local.fingerprint
    return ds["id"], local


def train_job(client: httpx.Client, dataset_id: str, name: str, **kw) -> str:
    job = ok(client.post("/train-jobs", json={"dataset_id": dataset_id, "name": name, **TINY, **kw}), 202)
    assert job["status"] in ("queued", "running") and job["kind"] == "train"
    done = wait_job(client, f"/jobs/{job['id']}")
    assert done["status"] == "succeeded", done["error"]
    return done["result"]["model_id"]


def upload_recipe(client: httpx.Client, local_ds, tmp: Path, dataset_id: str, name: str = "elsewhere",
                  seed: int = 7) -> str:
    from models.train import TrainConfig, train

    cfg = TrainConfig(**{**TINY, "epochs": 1}, seed=seed, options={"mask_prob": 0.3})
    out = train(local_ds, cfg, tmp / f"{name}.safetensors")
    with open(out.checkpoint, "rb") as f:
        row = ok(client.post("/recipes", files={"file": (f"{name}.safetensors", f)},
                             data={"name": name, "dataset_id": dataset_id}), 201)
    assert row["sha256"] == out.sha256 and row["kind"] == "recipe"
    return row["id"]


def upload_untrained(client: httpx.Client, local_ds, tmp: Path, dataset_id: str, name: str, seed: int) -> str:
    """A recipe registered from a random initialisation: an ingredient without a training run, for tests
    about the jobs around a merge rather than its quality."""
    import torch

    from models.backbone import SeqRecModel
    from models.checkpoint import CheckpointMeta, save_checkpoint
    from models.config import BackboneConfig

    shape = {k: TINY[k] for k in ("hidden", "layers", "heads", "inner", "max_len")}
    cfg = BackboneConfig(n_items=local_ds.n_items, **shape)
    torch.manual_seed(seed)
    path = tmp / f"{name}.safetensors"
    save_checkpoint(path, SeqRecModel(cfg).state_dict(),
                    CheckpointMeta(backbone=cfg, recipe={"name": "bert4rec"}, dataset_fingerprint=local_ds.fingerprint,
                                   n_items=local_ds.n_items))
    with open(path, "rb") as f:
        row = ok(client.post("/recipes", files={"file": (path.name, f)},
                             data={"name": name, "dataset_id": dataset_id}), 201)
    return row["id"]


def merge_job(client: httpx.Client, model_ids: list[str], **kw) -> dict:
    body = {"method": METHOD, "model_ids": model_ids, "evaluate": True, **kw}
    if METHOD == "fisher":
        body["fisher"] = {"sampling": "model", "n": 4}
    job = ok(client.post("/merge-jobs", json=body), 202)
    assert job["kind"] == "merge" and job["result_model_id"] is None
    return job


def run_flow(client: httpx.Client, tmp: Path) -> None:
    dataset_id, local = upload_dataset(client, tmp)
    base = train_job(client, dataset_id, "base")
    elsewhere = upload_recipe(client, local, tmp, dataset_id)

    job = merge_job(client, [base, elsewhere])
    kinds = sorted(c["kind"] for c in job["children"])
    # `base` was scored by its training job already; the uploaded recipe needs an evaluation job.
    assert kinds == (["evaluate", "fisher", "fisher"] if METHOD == "fisher" else ["evaluate"])
    done = wait_job(client, f"/merge-jobs/{job['id']}")
    assert done["status"] == "succeeded", (done["error"], done["children"])
    assert all(c["status"] == "succeeded" for c in done["children"])
    merged = done["result_model_id"]
    assert done["merged"]["model_id"] == merged
    for m in [done["merged"], *done["ingredients"]]:
        ndcg = m["metrics"]["test"]["full"]["ndcg@10"]
        assert 0.0 <= ndcg <= 1.0, m
    assert [m["model_id"] for m in done["ingredients"]] == [base, elsewhere]
    row = ok(client.get(f"/models/{merged}"))
    assert row["kind"] == "merged" and row["merge"]["method"] == METHOD and row["source_job_id"] == job["id"]
    assert len(ok(client.get("/models", params={"kind": "merged"}))) == 1

    # A second identical request reuses the cached Fishers and the ingredients' scores: no child jobs.
    again = merge_job(client, [base, elsewhere])
    assert again["children"] == []
    again = wait_job(client, f"/merge-jobs/{again['id']}")
    assert again["status"] == "succeeded" and again["result_model_id"] == merged  # same bytes, same model

    by_id = ok(client.get("/recommend/1", params={"model": merged, "k": 3}))
    assert by_id["model_id"] == merged and len(by_id["items"]) == 3
    ok(client.put("/aliases/production", json={"model_id": merged}))
    via_alias = ok(client.get("/recommend/1", params={"model": "production", "k": 3}))
    assert via_alias == by_id
    ok(client.put("/aliases/production", json={"model_id": base}))  # hot swap, no restart
    swapped = ok(client.get("/recommend/1", params={"model": "production", "k": 3}))
    assert swapped["model_id"] == base
    assert swapped == ok(client.get("/recommend/1", params={"model": base, "k": 3}))
