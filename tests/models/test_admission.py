"""Checkpoint admission (models/admission.py): a lying header is refused before anything is built or
allocated from it, in bounded time and memory, with a message that names the file."""

from __future__ import annotations

import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from models.backbone import SeqRecModel
from models.checkpoint import CheckpointMeta, admit, atomic_save, load_model, read_metadata, save_checkpoint
from models.config import BackboneConfig
from models.errors import CheckpointError
from tests.lying_headers import join, lying_checkpoints, split

CFG = BackboneConfig(n_items=30, hidden=16, layers=2, heads=2, inner=32, max_len=20)


def _meta(cfg=CFG) -> CheckpointMeta:
    return CheckpointMeta(backbone=cfg, recipe={"name": "bert4rec"}, dataset_fingerprint="f" * 64, n_items=cfg.n_items)


def _good_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "good.safetensors"
        torch.manual_seed(0)
        save_checkpoint(path, SeqRecModel(CFG).state_dict(), _meta())
        return path.read_bytes()


CASES = lying_checkpoints(_good_bytes())  # built at collection: the case names become the test ids


@pytest.fixture(scope="module")
def good() -> bytes:
    return _good_bytes()


def test_the_good_file_is_admitted(good, tmp_path):
    path = tmp_path / "g.safetensors"
    path.write_bytes(good)
    assert admit(path).backbone == CFG


@pytest.mark.parametrize("name, content", CASES, ids=[c[0] for c in CASES])
def test_every_lying_header_is_refused_fast_in_bounded_memory(tmp_path, name, content):
    path = tmp_path / "lie.safetensors"
    path.write_bytes(content)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CheckpointError) as e:
            admit(path, where="upload 'lie.safetensors'")
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(e.value).startswith("upload 'lie.safetensors': "), e.value  # names the input it was given
    assert str(tmp_path) not in str(e.value)
    assert elapsed < 1.0, (name, elapsed)
    # The header is at most 1 MiB; its JSON objects and a meta-device model stay well under 64 MiB.
    assert peak < 64 << 20, (name, peak)


def test_a_lying_layer_count_never_builds_the_model(good, tmp_path, monkeypatch):
    """layers=1000000 over a 2-layer file is refused by the bound alone; layers=45 (within the bound, as no
    tensor dimension is above 48) by the tensor count: no model of that depth is ever started."""
    built = []
    real_init = SeqRecModel.__init__
    monkeypatch.setattr(SeqRecModel, "__init__", lambda self, cfg: (built.append(cfg.layers), real_init(self, cfg))[1])
    for layers, why in ((1000000, "cannot fit these tensors"), (45, r"needs \d+ tensors, the file has 33")):
        header, data = split(good)
        header["__metadata__"]["backbone"] = header["__metadata__"]["backbone"].replace('"layers": 2',
                                                                                        f'"layers": {layers}')
        path = tmp_path / "deep.safetensors"
        path.write_bytes(join(header, data))
        with pytest.raises(CheckpointError, match=f"deep.safetensors: backbone layers={layers} {why}"):
            load_model(path)
    assert built and max(built) <= 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_file_is_admitted_and_built_in_float32(tmp_path, dtype):
    torch.manual_seed(1)
    state = {k: v.to(dtype) for k, v in SeqRecModel(CFG).state_dict().items()}
    path = tmp_path / "half.safetensors"
    save_checkpoint(path, state, _meta())
    model, _ = load_model(path)
    assert {p.dtype for p in model.state_dict().values()} == {torch.float32}
    assert torch.equal(model.state_dict()["out_bias"], state["out_bias"].float())


def test_mixed_or_integer_dtypes_are_refused_naming_the_tensor(tmp_path):
    state = SeqRecModel(CFG).state_dict()
    mixed = dict(state, out_bias=state["out_bias"].half())
    atomic_save(mixed, tmp_path / "mixed.safetensors", _meta().to_header())
    with pytest.raises(CheckpointError, match=r"mix the dtypes \['F16', 'F32'\]"):
        read_metadata(tmp_path / "mixed.safetensors")
    ints = dict(state, out_bias=state["out_bias"].to(torch.int32))
    atomic_save(ints, tmp_path / "int.safetensors", _meta().to_header())
    with pytest.raises(CheckpointError, match=r"int.safetensors: tensor 'out_bias' has dtype I32, the backbone expects "
                                              r"F32, F16 or BF16"):
        read_metadata(tmp_path / "int.safetensors")


def test_backbone_metadata_errors_name_the_file(good, tmp_path):
    header, data = split(good)
    header["__metadata__"]["backbone"] = "{oops"
    path = tmp_path / "named.safetensors"
    path.write_bytes(join(header, data))
    with pytest.raises(CheckpointError, match=r"named.safetensors: backbone metadata is not JSON"):
        read_metadata(path)


def test_expectations_follow_the_backbone_config(tmp_path):
    """A sasrec or wider model is admitted as itself: names and shapes come from the model, not a list."""
    for cfg in (BackboneConfig(n_items=7, kind="sasrec", hidden=8, layers=3, heads=4, inner=12, max_len=5),
                BackboneConfig(n_items=50, hidden=24, layers=1, heads=3, inner=8, max_len=64)):
        path = tmp_path / f"{cfg.kind}-{cfg.layers}.safetensors"
        save_checkpoint(path, SeqRecModel(cfg).state_dict(), _meta(cfg))
        assert admit(path).backbone == cfg
