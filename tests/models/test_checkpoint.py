import json
import struct

import pytest
import torch

from models.backbone import SeqRecModel
from models.checkpoint import (
    CheckpointMeta,
    check_safetensors_file,
    file_sha256,
    load_checkpoint,
    load_model,
    read_metadata,
    save_checkpoint,
)
from models.config import BackboneConfig
from models.errors import CheckpointError

CFG = BackboneConfig(n_items=20, hidden=8, layers=1, heads=2, inner=16, max_len=6)


def meta(**kw):
    return CheckpointMeta(backbone=kw.pop("backbone", CFG), recipe={"name": "bert4rec"},
                          dataset_fingerprint="f" * 64, n_items=kw.pop("n_items", 20), **kw)


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    m = SeqRecModel(CFG)
    path = tmp_path / "a.safetensors"
    sha = save_checkpoint(path, m.state_dict(), meta(merge={"method": "uniform"}))
    assert sha == file_sha256(path)
    state, got = load_checkpoint(path)
    for k, v in m.state_dict().items():
        assert torch.equal(state[k], v)
    assert got.backbone == CFG and got.recipe == {"name": "bert4rec"} and got.merge == {"method": "uniform"}
    loaded, _ = load_model(path)
    x = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(loaded.next_item_scores(x), m.eval().next_item_scores(x))
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temporary left behind


@pytest.mark.parametrize("name,content,msg", [
    ("w.pt", b"\x80\x02}q\x00.", "pickled"),
    ("w.bin", b"\x80\x02}q\x00.", "pickled"),
    ("w.safetensors", b"", "too short"),
    ("w.safetensors", b"\x80\x02}q\x00.garbage", "bad header length"),
    ("w.safetensors", struct.pack("<Q", 2) + b"[]", "header is not JSON"),
])
def test_refuses_files_that_are_not_safetensors(tmp_path, name, content, msg):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(CheckpointError, match=msg):
        check_safetensors_file(p)


def test_refuses_truncated_file(tmp_path):
    p = tmp_path / "a.safetensors"
    save_checkpoint(p, SeqRecModel(CFG).state_dict(), meta())
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated"):
        read_metadata(p)


def test_refuses_nan_on_save_and_on_load(tmp_path):
    state = SeqRecModel(CFG).state_dict()
    state["out_bias"][3] = float("nan")
    with pytest.raises(CheckpointError, match="out_bias.*NaN"):
        save_checkpoint(tmp_path / "nan.safetensors", state, meta())
    assert list(tmp_path.iterdir()) == []
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / "raw.safetensors"), metadata=meta().to_header())
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(tmp_path / "raw.safetensors")


def test_refuses_foreign_metadata_and_wrong_shapes(tmp_path):
    from safetensors.torch import save_file
    state = SeqRecModel(CFG).state_dict()
    save_file(state, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a recmerge checkpoint"):
        read_metadata(tmp_path / "plain.safetensors")
    head = meta().to_header()
    head["n_items"] = "21"
    save_file(state, str(tmp_path / "n.safetensors"), metadata=head)
    with pytest.raises(CheckpointError, match="disagrees"):
        read_metadata(tmp_path / "n.safetensors")
    bigger = BackboneConfig(n_items=20, hidden=8, layers=1, heads=2, inner=32, max_len=6)
    save_file(state, str(tmp_path / "s.safetensors"), metadata=meta(backbone=bigger).to_header())
    with pytest.raises(CheckpointError, match="shape"):
        load_model(tmp_path / "s.safetensors")
    head = meta().to_header()
    head["backbone"] = json.dumps({"n_items": 20, "colour": "red"})
    save_file(state, str(tmp_path / "b.safetensors"), metadata=head)
    with pytest.raises(CheckpointError, match="unknown fields"):
        read_metadata(tmp_path / "b.safetensors")
