"""The same work on a CUDA device as on the CPU: Fisher estimation (every computation and selection),
training every recipe, evaluation, top-k and the representation metrics. Skipped where torch sees no
CUDA device (this project's CI machines); on a GPU machine: `.venv/bin/python -m pytest -q tests/test_cuda.py`.
RECMERGE_TEST_DEVICE names another device to compare with the CPU (`cpu` checks these tests themselves
on a machine without a GPU)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from merging.fisher import estimate_fisher, load_fisher
from merging.fisher_compute import compute_fisher
from models.checkpoint import load_checkpoint, load_model
from models.evaluate import evaluate
from models.recipes import RECIPES
from models.recommend import top_k
from models.representation import representation_metrics, uniformity
from models.train import TrainConfig, train
from tests.merging.tiny_fisher import SELECTIONS, SEQS, TARGETS, tiny_model
from tests.synthetic import make_planted_dataset

DEV = torch.device(os.environ.get("RECMERGE_TEST_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEV.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")
SMALL = dict(hidden=32, layers=1, heads=2, inner=64, max_len=20, batch_size=32, dropout=0.1, lr=3e-3)


def close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    """Equal up to `rel` of the larger tensor's largest entry (summation order differs between devices)."""
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-30)
    return (a.cpu() - b.cpu()).abs().max().item() <= rel * scale


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    return make_planted_dataset(tmp_path_factory.mktemp("planted"), n_users=200, n_items=50)


@pytest.mark.parametrize("kind", ["bert4rec", "sasrec"])
@pytest.mark.parametrize("computation", ["per-example", "batchwise"])
@pytest.mark.parametrize("sampling,n", SELECTIONS)
def test_fisher_on_the_device_equals_the_cpu(kind, computation, sampling, n):
    cpu = tiny_model(kind)
    gpu = copy.deepcopy(cpu).to(DEV)
    want = compute_fisher(cpu, SEQS, TARGETS, sampling=sampling, n=n, computation=computation, batch_size=3)
    got = compute_fisher(gpu, SEQS, TARGETS, sampling=sampling, n=n, computation=computation, batch_size=3)
    assert set(got) == set(want)
    for k in want:
        assert got[k].device.type == DEV.type
        assert close(got[k], want[k], 1e-9), k  # float64 model: only the summation order differs


@pytest.fixture(scope="module")
def trained(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    return train(planted, TrainConfig(epochs=3, patience=0, device="cpu", **SMALL), out / "m.safetensors")


def test_estimate_fisher_on_the_device_writes_the_cpu_values(planted, trained, tmp_path):
    settings = {"sampling": "topk", "n": 5}
    a = estimate_fisher(trained.checkpoint, planted, settings, out=tmp_path / "cpu.safetensors", device="cpu")
    b = estimate_fisher(trained.checkpoint, planted, settings, out=tmp_path / "gpu.safetensors", device=DEV)
    (fa, ha), (fb, hb) = load_fisher(a.path), load_fisher(b.path)
    assert ha["checkpoint_sha256"] == hb["checkpoint_sha256"] and set(fa) == set(fb)
    for k in fa:
        assert fb[k].device.type == "cpu" and close(fa[k], fb[k], 1e-4), k  # float32 model


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_trains_on_the_device(planted, tmp_path, recipe):
    res = train(planted, TrainConfig(recipe=recipe, epochs=2, patience=0, device=str(DEV), **SMALL),
                tmp_path / f"{recipe}.safetensors")
    state, _ = load_checkpoint(res.checkpoint)
    assert all(t.device.type == "cpu" and torch.isfinite(t).all() for t in state.values())
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    assert res.valid["ndcg@10"] > 0


def test_evaluation_and_top_k_on_the_device_equal_the_cpu(planted, trained):
    model, _ = load_model(trained.checkpoint, device="cpu")
    want = evaluate(model, planted, split="test", device="cpu")
    got = evaluate(copy.deepcopy(model).to(DEV), planted, split="test", device=DEV)
    for protocol, metrics in want.items():
        for name, value in metrics.items():
            assert got[protocol][name] == pytest.approx(value, abs=1e-3), (protocol, name)
    histories = [s for s in planted.train_sequences()[:20]]
    _, s_cpu = top_k(model, histories, 10, planted.n_items, device="cpu")
    _, s_gpu = top_k(copy.deepcopy(model).to(DEV), histories, 10, planted.n_items, device=DEV)
    # The k best scores agree; which of two nearly tied items comes first may not.
    assert close(torch.from_numpy(s_gpu), torch.from_numpy(s_cpu), 1e-4)


def test_representation_metrics_on_the_device_equal_the_cpu(planted, trained):
    model, _ = load_model(trained.checkpoint, device="cpu")
    want = representation_metrics(model, planted, max_users=64)
    got = representation_metrics(copy.deepcopy(model).to(DEV), planted, max_users=64)
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    x = torch.randn(1500, 16, dtype=torch.float64)  # more rows than one block (_ROWS) of the kernel sum
    assert uniformity(x.to(DEV)) == pytest.approx(uniformity(x), rel=1e-9)
