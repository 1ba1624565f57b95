"""Resumable training: an interrupted run continued with resume=True ends in the same bytes as an
uninterrupted one; the learning-rate schedule; a state from another run is refused."""

import json

import pytest

from models.errors import RecmergeError
from models.train import TrainConfig, lr_factor, train
from models.train_state import state_path
from tests.synthetic import make_planted_dataset

SMALL = dict(hidden=16, layers=1, heads=1, inner=16, max_len=12, batch_size=32, dropout=0.2, lr=3e-3,
             warmup_steps=5, epochs=4)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return make_planted_dataset(tmp_path_factory.mktemp("planted"), n_users=120, n_items=40)


class Interrupt(Exception):
    pass


def _stop_after(epochs_done: int, total: int):
    def progress(stage, fraction):
        if fraction * total > epochs_done:  # the first batch of the next epoch
            raise Interrupt
    return progress


@pytest.mark.parametrize("recipe,backbone", [("bert4rec", "sasrec"), ("bert4rec", "bert4rec"),
                                             ("ehrec-learn", "sasrec")])
def test_interrupted_then_resumed_equals_uninterrupted(planted, tmp_path, recipe, backbone):
    cfg = dict(recipe=recipe, backbone=backbone, **SMALL)
    whole = train(planted, TrainConfig(**cfg), tmp_path / "whole.safetensors")
    out = tmp_path / "cut.safetensors"
    with pytest.raises(Interrupt):
        train(planted, TrainConfig(**cfg), out, progress=_stop_after(2, 4))
    assert not out.exists() and state_path(out).exists()
    resumed = train(planted, TrainConfig(resume=True, **cfg), out)
    assert resumed.sha256 == whole.sha256
    log = json.loads(resumed.log_path.read_text())
    assert [e["epoch"] for e in log["epochs"]] == [1, 2, 3, 4]
    assert [e["loss"] for e in log["epochs"]] == [e["loss"] for e in whole.history]
    # Resuming a finished run rewrites the same checkpoint without training again.
    again = train(planted, TrainConfig(resume=True, **cfg), out)
    assert again.sha256 == whole.sha256 and len(again.history) == 4


def test_without_resume_a_run_starts_over(planted, tmp_path):
    out = tmp_path / "m.safetensors"
    with pytest.raises(Interrupt):
        train(planted, TrainConfig(**SMALL), out, progress=_stop_after(1, 4))
    fresh = train(planted, TrainConfig(**SMALL), out)
    assert [e["epoch"] for e in fresh.history] == [1, 2, 3, 4]


def test_a_state_from_another_run_is_refused(planted, tmp_path):
    out = tmp_path / "m.safetensors"
    with pytest.raises(Interrupt):
        train(planted, TrainConfig(**SMALL), out, progress=_stop_after(1, 4))
    with pytest.raises(RecmergeError, match="belongs to another run"):
        train(planted, TrainConfig(resume=True, **{**SMALL, "lr": 1e-3}), out)
    state_path(out).write_bytes(b"not a state")
    with pytest.raises(RecmergeError, match="not a readable training state"):
        train(planted, TrainConfig(resume=True, **SMALL), out)


def test_schedule_warms_up_then_decays_to_its_floor():
    cfg = TrainConfig(lr=1.0, warmup_steps=10, final_lr_ratio=0.1)
    assert lr_factor(cfg, 0, 0.0) == pytest.approx(0.1)
    assert lr_factor(cfg, 9, 0.0) == pytest.approx(1.0)
    assert lr_factor(cfg, 100, 0.5) == pytest.approx(0.55)
    assert lr_factor(cfg, 100, 1.0) == pytest.approx(0.1)
    assert lr_factor(cfg, 100, 2.0) == pytest.approx(0.1)
    const = TrainConfig(schedule="constant", warmup_steps=0)
    assert lr_factor(const, 5, 0.9) == 1.0
    with pytest.raises(RecmergeError, match="schedule must be one of"):
        TrainConfig(schedule="linear")


def test_a_state_becomes_a_checkpoint_later_runs_start_from(planted, tmp_path):
    import torch
    from safetensors.torch import save_file

    from bench.spawn_point import spawn_point
    from models.checkpoint import load_model, read_metadata
    from models.errors import CheckpointError
    from models.train_state import weights_of

    out = tmp_path / "trunk.safetensors"
    with pytest.raises(Interrupt):
        train(planted, TrainConfig(backbone="sasrec", **SMALL), out, progress=_stop_after(2, 4))
    weights, info = weights_of(state_path(out))
    assert info["epoch"] == 2 and len(info["history"]) == 2
    like = train(planted, TrainConfig(backbone="sasrec", **{**SMALL, "epochs": 1}), tmp_path / "like.safetensors")
    spawn = spawn_point(state_path(out), like.checkpoint, tmp_path / "spawn.safetensors")
    assert spawn["epoch"] == 2 and spawn["valid_ndcg@10"] == info["history"][-1]["valid_ndcg@10"]
    model, meta = load_model(tmp_path / "spawn.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k])
    assert meta.backbone == read_metadata(like.checkpoint).backbone
    # the spawn point is the interrupted run's epoch 2: resuming it for epochs 3-4 starts from these weights
    assert not all(torch.equal(v, load_model(like.checkpoint)[0].state_dict()[k]) for k, v in weights.items())

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"), metadata={"format": "other"})
    with pytest.raises(CheckpointError, match="not a recmerge training state"):
        weights_of(tmp_path / "plain.safetensors")
    wide = train(planted, TrainConfig(backbone="sasrec", **{**SMALL, "epochs": 1, "hidden": 8}),
                 tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError, match="do not fit"):
        spawn_point(state_path(out), wide.checkpoint, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
