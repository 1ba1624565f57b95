"""‖F‖², the one definition (merging/fisher_norm.py): the value a Fisher carries in its metadata is the value
a merge computes from the file, bit for bit, however the file is cut into reads."""

import math
import random

import pytest
import torch
from safetensors.torch import save_file

from merging.fisher_norm import FIELD, NORM_BLOCK, SquaredNorm, sq_norm_of_tensors, stored_sq_norm, with_sq_norm
from merging.io import SafetensorsReader
from merging.merge import file_sq_norm
from models.errors import CheckpointError


def awkward_fisher() -> dict[str, torch.Tensor]:
    """Sizes off every block boundary: below one block, one past it, across the 64-block conversion step,
    a 0-d and an empty tensor, a half-precision one, values over many magnitudes."""
    g = torch.Generator().manual_seed(7)
    return {
        "b.small": torch.rand(3, 7, generator=g),
        "a.big": torch.rand(1031, 1067, generator=g) * torch.logspace(-6, 6, 1067),  # 1,100,077 entries
        "c.block_plus_one": torch.rand(NORM_BLOCK + 1, generator=g),
        "d.just_under": torch.rand(129, 127, generator=g),
        "e.scalar": torch.tensor(3.5),
        "f.empty": torch.zeros(0, 5),
        "g.half": torch.rand(300, 77, generator=g).bfloat16(),
    }


def exact_sq_norm(tensors) -> float:
    """Σ F², correctly rounded: each square is exact in float64, fsum rounds once."""
    return math.fsum(v for t in tensors.values() for v in t.double().square().reshape(-1).tolist())


@pytest.fixture
def fisher_file(tmp_path):
    tensors = awkward_fisher()
    path = tmp_path / "f.safetensors"
    save_file(tensors, str(path), metadata=with_sq_norm({"sampling": "exact"}, tensors))
    return path, tensors


@pytest.mark.parametrize("chunk_bytes", [1, 100, 5000, 4 << 20, 64 << 20])
def test_metadata_norm_equals_the_norm_computed_from_the_file_bit_for_bit(fisher_file, chunk_bytes):
    path, tensors = fisher_file
    with SafetensorsReader(path) as r:
        stored = stored_sq_norm(r.metadata, path)
        from_file = file_sq_norm(r, chunk_bytes, lambda f: None)
        assert r.bytes_read == sum(t.nbytes for t in tensors.values())
    assert stored.hex() == from_file.hex()
    assert from_file == pytest.approx(exact_sq_norm(tensors), rel=1e-14)


def test_the_value_does_not_depend_on_how_entries_arrive_or_on_threads():
    tensors = awkward_fisher()
    whole = sq_norm_of_tensors(tensors)
    rng = random.Random(3)
    acc = SquaredNorm()
    for name in reversed(sorted(tensors)):  # any tensor order: the partials are summed by fsum
        flat, at = tensors[name].reshape(-1), 0
        while at < flat.numel():
            step = rng.choice([1, 2, 999, NORM_BLOCK - 1, NORM_BLOCK, 3 * NORM_BLOCK + 5, 200_000])
            acc.add(flat[at:at + step])
            at += step
        acc.end_tensor()
    assert acc.value.hex() == whole.hex()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert sq_norm_of_tensors(tensors).hex() == whole.hex()
    finally:
        torch.set_num_threads(before)


def test_the_field_round_trips_and_is_left_out_for_a_fisher_with_nan_or_inf():
    tensors = awkward_fisher()
    head = with_sq_norm({"sampling": "exact"}, tensors)
    assert stored_sq_norm(head, "f") == sq_norm_of_tensors(tensors) and head[FIELD] == repr(float(head[FIELD]))
    for bad in (float("nan"), float("inf")):
        poisoned = dict(tensors, **{"b.small": tensors["b.small"].clone().fill_(bad)})
        assert FIELD not in with_sq_norm({"sampling": "exact"}, poisoned)  # the merge then names the tensor
    assert stored_sq_norm({"sampling": "exact"}, "f") is None  # written before the field: computed from the file
    assert stored_sq_norm({FIELD: "0.0"}, "f") == 0.0  # a zero Fisher is refused by normalize, not here


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "-1e-300", "", "garbage", "1.0 2.0"])
def test_a_bad_field_is_refused_naming_the_file(raw):
    with pytest.raises(CheckpointError, match=r"^where/f\.safetensors: Fisher metadata sq_norm="):
        stored_sq_norm({FIELD: raw}, "where/f.safetensors")
