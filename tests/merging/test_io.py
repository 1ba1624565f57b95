"""Streaming safetensors IO: our reader agrees with the safetensors library on every dtype and on row
blocks; our writer's files open with safe_open; failures leave nothing behind; bad files are refused."""

import json
import os
import struct
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import merging.io
from merging.io import SafetensorsReader, SafetensorsWriter, header_bytes, row_blocks
from models.checkpoint import file_sha256
from models.errors import CheckpointError

SAMPLE = {
    "f32": torch.randn(7, 3),
    "f16": torch.randn(4, 5).half(),
    "bf16": torch.randn(6).bfloat16(),
    "f64": torch.randn(2, 2, 2).double(),
    "i64": torch.arange(9).reshape(3, 3),
    "mask": torch.tensor([True, False, True]),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 4),
}


def test_reader_matches_safetensors_on_every_dtype(tmp_path):
    path = tmp_path / "s.safetensors"
    save_file(SAMPLE, str(path), metadata={"k": "v"})
    with SafetensorsReader(path) as r:
        assert r.metadata == {"k": "v"}
        assert set(r.names) == set(SAMPLE)
        for name, t in SAMPLE.items():
            got = r.read(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got, t), name
        assert r.read("f32", 2, 6).equal(SAMPLE["f32"][2:6])
        assert r.bytes_read == sum(t.nbytes for t in SAMPLE.values()) + 4 * 3 * 4


def test_row_blocks_cover_a_tensor_in_bounded_pieces(tmp_path):
    path = tmp_path / "s.safetensors"
    save_file(SAMPLE, str(path))
    with SafetensorsReader(path) as r:
        info = r.tensors["f32"]  # 7 rows of 12 bytes
        blocks = row_blocks(info, chunk_bytes=30)
        assert blocks == [(0, 2), (2, 4), (4, 6), (6, 7)]
        assert torch.equal(torch.cat([r.read("f32", a, b) for a, b in blocks]), SAMPLE["f32"])
        assert row_blocks(r.tensors["scalar"], 1) == [(0, 1)]
        assert row_blocks(r.tensors["empty"], 1) == [(0, 0)]
        assert row_blocks(info, 1 << 20) == [(0, 7)]


def test_writer_streams_blocks_into_a_file_safe_open_reads(tmp_path, temp_kind):
    path = tmp_path / "out.safetensors"
    entries = [(n, t.dtype, tuple(t.shape)) for n, t in SAMPLE.items()]
    with SafetensorsWriter(path, entries, {"format": "x", "note": "ü"}) as w:
        for name, t in SAMPLE.items():
            if name == "f32":
                for a, b in [(0, 3), (3, 7)]:
                    w.write(name, t[a:b])
            else:
                w.write(name, t)
        sha = w.commit()
    assert sha == file_sha256(path)
    assert os.listdir(tmp_path) == ["out.safetensors"]
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "x", "note": "ü"}
        for name, t in SAMPLE.items():
            assert torch.equal(f.get_tensor(name), t), name


@pytest.fixture(params=["unnamed", "named"])
def temp_kind(request, monkeypatch):
    """Both ways a writer keeps its data before commit: a file without a name (O_TMPFILE), and the
    hidden temporary file used where the platform has none."""
    if request.param == "named":
        monkeypatch.setattr(merging.io, "_open_unnamed", lambda directory: None)
    return request.param


def test_writer_data_has_no_name_until_commit_on_linux(tmp_path):
    if sys.platform != "linux":
        pytest.skip("O_TMPFILE is Linux's")
    entries = [("a", torch.float32, (2, 2))]
    with SafetensorsWriter(tmp_path / "x.safetensors", entries, {"k": "0"}, provisional=True) as w:
        assert w.unnamed
        w.write("a", torch.ones(2, 2))
        assert os.listdir(tmp_path) == []  # a merge refused now would never have had a file here
        w.rewrite_header({"k": "1"})
        sha = w.commit()
    assert os.listdir(tmp_path) == ["x.safetensors"]
    assert sha == file_sha256(tmp_path / "x.safetensors")
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"k": "1"} and torch.equal(f.get_tensor("a"), torch.ones(2, 2))


def test_a_rewritten_header_is_hashed_back_either_way(tmp_path, temp_kind):
    entries = [("a", torch.float32, (64, 3))]
    with SafetensorsWriter(tmp_path / "x.safetensors", entries, {"k": "0" * 40}, provisional=True) as w:
        w.write("a", torch.arange(192.0).view(64, 3))
        w.rewrite_header({"k": "1" * 40})
        sha = w.commit()
    out = tmp_path / "x.safetensors"
    assert sha == file_sha256(out) and w.bytes_reread == out.stat().st_size  # read back through its descriptor
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_writer_leaves_nothing_when_interrupted_or_incomplete(tmp_path, temp_kind):
    entries = [("a", torch.float32, (2, 2)), ("b", torch.float32, (3,))]
    with pytest.raises(ValueError, match="boom"):
        with SafetensorsWriter(tmp_path / "x.safetensors", entries, {}) as w:
            w.write("a", torch.zeros(2, 2))
            assert w.unnamed == (temp_kind == "unnamed")
            # while writing: no entry at all, or the hidden temporary file
            assert len(os.listdir(tmp_path)) == (0 if w.unnamed else 1)
            raise ValueError("boom")
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="'b' was never"):
        with SafetensorsWriter(tmp_path / "x.safetensors", entries, {}) as w:
            w.write("a", torch.zeros(2, 2))
            w.commit()
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match="expected 'a'"):
        with SafetensorsWriter(tmp_path / "x.safetensors", entries, {}) as w:
            w.write("b", torch.zeros(3))
    with pytest.raises(RuntimeError, match="more bytes"):
        with SafetensorsWriter(tmp_path / "x.safetensors", entries, {}) as w:
            w.write("a", torch.zeros(3, 2))
    with pytest.raises(RuntimeError, match="dtype"):
        with SafetensorsWriter(tmp_path / "x.safetensors", entries, {}) as w:
            w.write("a", torch.zeros(2, 2, dtype=torch.float64))
    assert os.listdir(tmp_path) == []


def _gappy_file(path) -> None:
    """Tensors in reverse name order, with junk between them and after the last: legal for our reader."""
    header, data = {"__metadata__": {"k": "v"}}, b""
    for name in ["c", "b", "a"]:
        raw = torch.arange(6, dtype=torch.float32).add(ord(name)).numpy().tobytes()
        data += b"\x07" * 5
        header[name] = {"dtype": "F32", "shape": [3, 2], "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    _raw_file(path, header, data + b"tail")


@pytest.mark.parametrize("reads", [
    [("c", 0, 3), ("b", 0, 3), ("a", 0, 3)],  # everything, front to back
    [("c", 0, 1), ("c", 1, 3), ("a", 0, 3)],  # row blocks, and a tensor skipped: its bytes are hashed as a gap
    [("b", 2, 3)],  # one row in the middle: the rest is hashed before it and at the end
    [],
])
def test_reader_hashes_the_whole_file_as_it_reads_it_front_to_back(tmp_path, reads):
    path = tmp_path / "g.safetensors"
    _gappy_file(path)
    with SafetensorsReader(path) as r:
        assert r.hash_as_read(["c", "b", "a"])
        for name, a, b in reads:
            assert torch.equal(r.read(name, a, b), torch.arange(6.0).add(ord(name)).view(3, 2)[a:b])
        assert r.finish_hash() == file_sha256(path)
        assert r.bytes_read == path.stat().st_size  # each byte once, whatever the reads covered
        assert r.finish_hash() is None  # hashing is over


def test_reader_gives_no_hash_when_reads_do_not_go_front_to_back(tmp_path):
    path = tmp_path / "g.safetensors"
    _gappy_file(path)
    with SafetensorsReader(path) as r:
        assert not r.hash_as_read(["a", "b", "c"])  # the file holds c, b, a
        r.read("c")
        assert r.finish_hash() is None
        assert r.hash_as_read(["c", "b", "a"])
        r.read("b")
        r.read("c")  # went back after all
        r.read("a")
        assert r.finish_hash() is None


def test_a_provisional_header_is_rewritten_in_place(tmp_path):
    entries = [(n, t.dtype, tuple(t.shape)) for n, t in SAMPLE.items()]
    final = {"format": "x", "sha": "ab" * 32}
    with SafetensorsWriter(tmp_path / "p.safetensors", entries, {"format": "x", "sha": "0" * 64},
                           provisional=True) as w:
        for name, t in SAMPLE.items():
            w.write(name, t)
        w.rewrite_header(final)
        sha = w.commit()
    got = (tmp_path / "p.safetensors").read_bytes()
    assert got == header_bytes(entries, final) + b"".join(
        t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in SAMPLE.values())
    assert sha == file_sha256(tmp_path / "p.safetensors") and w.bytes_reread == len(got)
    with pytest.raises(RuntimeError, match="the new header is [0-9]+ bytes, the provisional one"):
        with SafetensorsWriter(tmp_path / "q.safetensors", entries, {"sha": "0" * 64}, provisional=True) as w:
            w.rewrite_header({"sha": "0" * 72})  # 8 bytes more than the padding can absorb
    with pytest.raises(RuntimeError, match="never rewritten"):
        with SafetensorsWriter(tmp_path / "q.safetensors", entries[:1], {"sha": "0" * 64}, provisional=True) as w:
            w.write(entries[0][0], SAMPLE[entries[0][0]])
            w.commit()
    assert os.listdir(tmp_path) == ["p.safetensors"]


def _raw_file(path, header: dict, data: bytes) -> None:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("pt", r"pickled checkpoints \(.pt\) are refused"),
    ("pickle-bytes", "not a safetensors file"),
    ("truncated", "truncated"),
    ("bad-offsets", "tensor 'w': offsets 0..8 do not fit dtype F32 and shape"),
    ("bad-dtype", "tensor 'w' has an unsupported or missing 'F8_E4M3'"),
    ("bad-meta", "metadata must map strings to strings"),
])
def test_reader_refuses_what_is_not_a_sound_safetensors_file(tmp_path, case, message):
    path = tmp_path / "bad.safetensors"
    if case == "pt":
        path = tmp_path / "model.pt"
        path.write_bytes(b"PK\x03\x04 a zip archive with a pickle inside")
    elif case == "pickle-bytes":
        path.write_bytes(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01a\x94K\x01u.")
    elif case == "truncated":
        save_file({"w": torch.randn(100)}, str(path))
        path.write_bytes(path.read_bytes()[:-16])
    elif case == "bad-offsets":
        _raw_file(path, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 12)
    elif case == "bad-dtype":
        _raw_file(path, {"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4)
    elif case == "bad-meta":
        _raw_file(path, {"__metadata__": {"n": 3}, "w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}},
                  b"\0")
    with pytest.raises(CheckpointError, match=message):
        SafetensorsReader(path)


def _resident(path) -> list[bool]:
    """Which of the file's pages the page cache holds (mincore over a private mapping that is never written)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    size = os.path.getsize(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
        anchor = ctypes.c_char.from_buffer(mm)
        vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
        rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(anchor)), ctypes.c_size_t(size), vec)
        del anchor  # the mapping cannot close while a pointer into it exists
    assert rc == 0, os.strerror(ctypes.get_errno())
    return [bool(v & 1) for v in vec]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mincore and DONTNEED as Linux has them")
def test_a_last_pass_leaves_nothing_it_read_in_the_page_cache(tmp_path):
    path = tmp_path / "big.safetensors"
    # The big tensor starts at an odd offset, as in real files: drop ranges must still cover whole folios.
    save_file({"a_small": torch.randn(3, 5), "b_big": torch.randn(3 << 20), "c_tail": torch.randn(7)}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # dirty pages cannot be dropped; inputs of a merge are long written
        while f.read(1 << 20):
            pass
    if not all(_resident(path)):
        pytest.skip("this file system does not keep what was read in the page cache")
    page = os.sysconf("SC_PAGE_SIZE")
    with SafetensorsReader(path, drop_cache=True) as r:
        info = r.tensors["b_big"]
        assert info.offset % page  # the case the alignment is for
        r.read("a_small")
        for a, b in row_blocks(info, 1 << 20):
            r.read("b_big", a, b)
            end = info.offset + b * 4
            behind = (end // merging.io.DROP_ALIGN * merging.io.DROP_ALIGN) // page
            assert not any(_resident(path)[:behind]), f"pages before byte {end} still cached"
        r.read("c_tail")
    assert not any(_resident(path))  # close dropped the tail; nothing read stays cached


def test_a_reader_without_drop_cache_leaves_the_page_cache_alone(tmp_path):
    path = tmp_path / "big.safetensors"
    save_file({"b_big": torch.randn(1 << 20)}, str(path))
    with SafetensorsReader(path) as r:
        for a, b in row_blocks(r.tensors["b_big"], 1 << 20):
            r.read("b_big", a, b)
    if sys.platform.startswith("linux"):
        assert all(_resident(path))  # what it read stays for the next reader
