"""Job errors name the inputs that caused them and show no server path (store, scratch, data directory)."""

from __future__ import annotations

from dataclasses import asdict

import torch

from core import jobs
from core.db_models import Dataset, Model
from models.backbone import SeqRecModel
from models.checkpoint import CheckpointMeta, save_checkpoint
from models.config import BackboneConfig
from tests.synthetic import make_planted_dataset
from tests.workers.conftest import submit, wait
from workers.public_errors import public_error


def test_public_error_names_labelled_paths_and_hides_the_rest():
    sha = "ab" * 32
    text = (f"/srv/data/store/objects/ab/{sha}: tensor 'x' has dtype F16, /srv/data/store/objects/cd/{'cd' * 32} "
            "has F32; scratch /srv/data/tmp/jobs/j.1/merged.safetensors")
    got = public_error(text, [(f"/srv/data/store/objects/ab/{sha}", "model m1 (base)")], ["/srv/data"])
    assert got == ("model m1 (base): tensor 'x' has dtype F16, artifact cdcdcdcdcdcd has F32; "
                   "scratch a server file")


def test_a_failed_merge_names_its_models_not_their_store_paths(bg, tmp_path):
    """fp16 and fp32 files are each admitted, but cannot be merged together: the job's error, raised with
    the store's paths in it, reaches the row with the models' ids instead."""
    make_planted_dataset(tmp_path / "raw", n_users=60, n_items=30)
    sha = bg.res.store.put_file(tmp_path / "raw" / "planted.txt")
    prep = wait(bg.res, submit(bg.res, "prepare", {"source": f"upload:{sha}", "filename": "planted.txt",
                                                   "fmt": "sasrec", "name": "planted"}))
    assert prep.status == "succeeded", prep.error
    with bg.res.session() as s:
        ds = s.get(Dataset, prep.result["dataset_id"])
    cfg = BackboneConfig(n_items=ds.n_items, hidden=8, layers=1, heads=2, inner=16, max_len=10)
    ids = []
    for name, dtype in (("full", torch.float32), ("half", torch.float16)):
        path = tmp_path / f"{name}.safetensors"
        state = {k: v.to(dtype) for k, v in SeqRecModel(cfg).state_dict().items()}
        save_checkpoint(path, state, CheckpointMeta(backbone=cfg, recipe={"name": "bert4rec"},
                                                    dataset_fingerprint=ds.fingerprint, n_items=ds.n_items))
        digest = bg.res.store.put_file(path)
        with bg.res.session() as s, s.begin():
            ids.append(jobs.register_model(s, kind="recipe", name=name, dataset_id=ds.id, sha256=digest,
                                           size=path.stat().st_size, backbone=asdict(cfg),
                                           recipe={"name": "bert4rec"}, merge=None).id)
    with bg.res.session() as s:
        names = {m.id: m.name for m in s.query(Model).all()}
    job = wait(bg.res, submit(bg.res, "merge", {"method": "uniform", "model_ids": ids, "evaluate": False}))
    assert job.status == "failed"
    assert "dtype" in job.error
    assert f"model {ids[1]} ({names[ids[1]]})" in job.error and f"model {ids[0]} ({names[ids[0]]})" in job.error
    settings = bg.res.settings
    for root in (settings.DATA_DIR, settings.tmp_dir, bg.res.store.root):
        assert str(root) not in job.error
