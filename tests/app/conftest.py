"""Each API test owns its service: a SQLite file and a store under tmp_path, built with create_app."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.main import create_app
from core.db_models import Base
from core.settings import Settings
from models.backbone import SeqRecModel
from models.checkpoint import CheckpointMeta, save_checkpoint
from models.config import BackboneConfig
from tests.conftest_services import free_port, postgres_url, redis_server, redis_url, s3_endpoint  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
TOKEN = "s3cret-token"


def make_settings(root: Path, **overrides) -> Settings:
    # Every field that the environment could set is given, so a developer's RECMERGE_* never leaks in.
    base = dict(DATA_DIR=root, BROKER_URL=None, DATABASE_URL="", STORE_URL="", API_TOKEN=None,
                MAX_UPLOAD_BYTES=64 * 1024 * 1024, MODEL_CACHE_SIZE=4, TORCH_THREADS=1)
    return Settings(**{**base, **overrides})


def interactions_csv(n_users: int = 40, n_items: int = 30, seed: int = 0) -> bytes:
    """user,item,ts rows; original item ids 101.. and user ids u1.. so they differ from internal ids."""
    rng = np.random.default_rng(seed)
    rows = ["user,item,ts"]
    for u in range(n_users):
        items = rng.permutation(n_items)[: rng.integers(6, 16)]
        rows += [f"u{u + 1},{101 + i},{t}" for t, i in enumerate(items)]
    rows += [f"u1,{101 + i},{100 + i}" for i in range(n_items)]  # every item occurs
    return ("\n".join(rows) + "\n").encode()


def checkpoint_bytes(tmp_path: Path, fingerprint: str, n_items: int, seed: int = 0, tamper=None,
                     **backbone) -> bytes:
    """A random-init recmerge checkpoint; `tamper(state_dict)` edits tensors before saving."""
    cfg = BackboneConfig(n_items=n_items, **{"hidden": 16, "layers": 1, "heads": 2, "inner": 32,
                                             "max_len": 20, **backbone})
    torch_seed(seed)
    state = SeqRecModel(cfg).state_dict()
    if tamper is not None:
        tamper(state)
    path = tmp_path / f"ckpt-{seed}-{id(tamper)}.safetensors"
    meta = CheckpointMeta(backbone=cfg, recipe={"name": "bert4rec"}, dataset_fingerprint=fingerprint,
                          n_items=n_items)
    if tamper is None:
        save_checkpoint(path, state, meta)
    else:  # save_checkpoint refuses NaN; a client's file may hold anything
        from models.checkpoint import atomic_save

        atomic_save(state, path, meta.to_header())
    return path.read_bytes()


def multipart_stream(fields: dict[str, str], filename: str, chunks):
    """(body iterator, content type) of a multipart form whose file part is streamed from `chunks`: the
    client never holds the file, and no Content-Length is sent."""
    boundary = "recmerge-test-boundary"

    def body():
        for name, value in fields.items():
            yield f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        yield (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        yield from chunks
        yield f"\r\n--{boundary}--\r\n".encode()

    return body(), f"multipart/form-data; boundary={boundary}"


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


class Service:
    """A TestClient plus what a test needs to look behind the API: counts of rows, files in the store."""

    def __init__(self, client: TestClient, token: str | None):
        self.client = client
        self.app = client.app
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def finished(self, path: str, timeout: float = 180.0) -> dict:
        """The job at `path` once it has ended; it must have succeeded."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            job = self.client.get(path).json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                assert job["status"] == "succeeded", job["error"]
                return job
            time.sleep(0.1)
        raise AssertionError(f"{path} still {job['status']}")

    def counts(self) -> dict[str, int]:
        with self.app.state.sessions() as s:
            return {t.name: s.scalar(select(func.count()).select_from(t)) for t in Base.metadata.sorted_tables}

    def files(self) -> set[str]:
        """Every file under the data directory except the database: store objects, datasets, scratch."""
        root = self.app.state.settings.DATA_DIR
        return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and "recmerge.db" not in p.name}

    def snapshot(self) -> tuple[dict[str, int], set[str]]:
        return self.counts(), self.files()

    def upload_dataset(self, data: bytes | None = None, name: str = "tiny", filename: str = "inter.csv", **fields):
        r = self.client.post("/datasets", headers=self.headers, data={"name": name, **fields},
                             files={"file": (filename, io.BytesIO(data or interactions_csv()))})
        assert r.status_code in (200, 201), r.text
        return r.json()

    def upload_recipe(self, content: bytes, dataset_id: str, name: str = "r", filename: str = "r.safetensors",
                      **fields):
        return self.client.post("/recipes", headers=self.headers,
                                data={"name": name, "dataset_id": dataset_id, **fields},
                                files={"file": (filename, io.BytesIO(content))})


@pytest.fixture
def make_service(tmp_path):
    clients = []

    def make(token: str | None = None, **overrides) -> Service:
        settings = make_settings(tmp_path / f"svc{len(clients)}", API_TOKEN=token, **overrides)
        client = TestClient(create_app(settings, jobs=False))
        client.__enter__()
        clients.append(client)
        return Service(client, token)

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def svc(make_service) -> Service:
    return make_service()


@pytest.fixture
def dataset(svc) -> dict:
    return svc.upload_dataset()


@pytest.fixture
def recipe(svc, dataset, tmp_path) -> dict:
    r = svc.upload_recipe(checkpoint_bytes(tmp_path, dataset["fingerprint"], dataset["n_items"]), dataset["id"])
    assert r.status_code == 201, r.text
    return r.json()
