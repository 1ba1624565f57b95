"""What the dashboard's browser test and bench/screenshots.py share: an embedded service on a free port in
this process, a dataset with item titles, recipe checkpoints to upload, and Debian's chromium."""

from __future__ import annotations

import shutil
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

CHROMIUM = "/usr/bin/chromium"


def chromium_path() -> str | None:
    return CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")


def launch(playwright):
    # Root in a container has no user namespaces for chromium's sandbox.
    return playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=["--no-sandbox"])


def settings_for(root: Path, **overrides):
    from core.settings import Settings

    # Every field the environment could set is given, so a developer's RECMERGE_* never leaks in.
    base = dict(DATA_DIR=root, BROKER_URL=None, DATABASE_URL="", STORE_URL="", API_TOKEN=None, READ_TOKEN=None,
                RECOMMEND_TOKEN=None, MAX_UPLOAD_BYTES=64 * 1024 * 1024, TORCH_THREADS=1, FORWARD="thread",
                SWEEP_INTERVAL_S=0.5)
    return Settings(**{**base, **overrides})


@contextmanager
def serve(root: Path, jobs: bool = True, **overrides):
    """(base URL, app) of create_app(...) under uvicorn in a thread, jobs running in-process when `jobs`."""
    import uvicorn

    from app.main import create_app
    from tests.conftest_services import free_port_number

    app = create_app(settings_for(root, **overrides), jobs=jobs)
    port = free_port_number()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="dashboard-server", daemon=True)
    thread.start()
    end = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > end:
            raise AssertionError("the embedded server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def write_titled_source(folder: Path, n_users: int = 60, n_items: int = 40, seed: int = 0) -> Path:
    """u.data and u.item as ml-100k lays them out, so the prepared dataset carries titles."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for u in range(1, n_users + 1):
        start, length = rng.integers(1, n_items + 1), rng.integers(6, 14)
        rows += [f"{u}\t{(start + t - 1) % n_items + 1}\t4\t{1000 + t}" for t in range(length)]
    rows += [f"1\t{i}\t4\t{2000 + i}" for i in range(1, n_items + 1)]  # every item occurs
    (folder / "u.data").write_text("\n".join(rows) + "\n")
    titles = [f"{i}|Film number {i} ({1950 + i})|01-Jan-1995" for i in range(1, n_items + 1)]
    (folder / "u.item").write_text("\n".join(titles) + "\n", encoding="latin-1")
    return folder / "u.data"


def register_dataset(app, source: Path, name: str = "films") -> dict:
    """Prepare a dataset and register it as the prepare job would: its directory in the store, its row."""
    from core.db_models import Dataset
    from models.data import prepare_dataset

    ds = prepare_dataset(source, source.parent / "prepared")
    app.state.store.put_dir(ds.fingerprint, source.parent / "prepared")
    with app.state.sessions() as s:
        row = Dataset(name=name, fingerprint=ds.fingerprint, source="films", params={}, n_users=ds.n_users,
                      n_items=ds.n_items, n_interactions=ds.n_interactions)
        s.add(row)
        s.commit()
        return {"id": row.id, "fingerprint": ds.fingerprint, "n_items": ds.n_items, "n_users": ds.n_users}


def write_checkpoint(path: Path, fingerprint: str, n_items: int, seed: int, recipe: str = "bert4rec") -> Path:
    """A small random-init checkpoint of the dataset: what a client uploads as a recipe."""
    import torch

    from models.backbone import SeqRecModel
    from models.checkpoint import CheckpointMeta, save_checkpoint
    from models.config import BackboneConfig

    cfg = BackboneConfig(n_items=n_items, hidden=16, layers=1, heads=2, inner=32, max_len=20)
    torch.manual_seed(seed)
    save_checkpoint(path, SeqRecModel(cfg).state_dict(),
                    CheckpointMeta(backbone=cfg, recipe={"name": recipe}, dataset_fingerprint=fingerprint,
                                   n_items=n_items))
    return path
