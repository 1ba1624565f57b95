"""The merge engine end to end on tiny checkpoints: streamed output equals the in-memory merge bit for
bit, the file opens everywhere and records its provenance, and every bad input is refused with its
reason and leaves no file (final or temporary) in the output directory."""

import json
import os
import re
import struct
import sys

import pytest
import torch
from safetensors import safe_open

from merging.merge import build_method, merge_checkpoints, merge_state_dicts
from merging.methods import MergeOptionsError
from models.checkpoint import CREATED_BY, file_sha256, load_checkpoint, load_model, parse_metadata
from models.config import BackboneConfig
from models.errors import CheckpointError, IncompatibleError
from tests.merging.factory import (
    CFG,
    FINGERPRINT,
    make_checkpoint,
    make_fisher,
    make_merge_inputs,
    tiny_state,
    write_raw,
    write_scrambled,
)


@pytest.fixture
def world(tmp_path):
    """Three checkpoints with Fishers, a base, and an empty output directory."""
    src = tmp_path / "in"
    src.mkdir()
    ckpts, fishers, base = make_merge_inputs(src, 3, base_seed=99, extra={"run": "run{i}", "team": "recsys"})
    out = tmp_path / "out"
    out.mkdir()
    return {"ckpts": ckpts, "fishers": fishers, "base": base, "out": out, "src": src}


def _fisher_dict(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


CASES = [
    ("uniform", {}, None),
    ("weighted", {}, [1.0, 2.0, 0.5]),
    ("fisher", {"normalize": True}, [2.0, 1.0, 1.0]),
    ("fisher", {"epsilon": 0.05}, None),
    ("task-arithmetic", {"alpha": 0.7}, [1.0, 0.5, 2.0]),
    ("ties", {"density": 0.3}, None),
    ("dare", {"p": 0.6, "seed": 5, "combine": "ties"}, [1.0, 1.0, 3.0]),
    ("dare", {"p": 0.3}, None),
]


@pytest.mark.parametrize("chunk_bytes", [32 << 20, 100])  # whole tensors, and blocks of a few rows
@pytest.mark.parametrize("method, options, weights", CASES)
def test_streamed_merge_equals_in_memory_merge_bit_for_bit(world, method, options, weights, chunk_bytes):
    m = build_method(method, 3, options, weights)
    base = world["base"] if m.needs_base else None
    fishers = world["fishers"] if m.needs_fisher else None
    out = world["out"] / "m.safetensors"
    res = merge_checkpoints(method, world["ckpts"], out, weights=weights, options=options, base=base,
                            fishers=fishers, chunk_bytes=chunk_bytes)
    got, _ = load_checkpoint(out)
    # The in-memory merge computes its own Fisher norms; the streamed one took them from the files' sq_norm.
    expected = merge_state_dicts(m, [load_checkpoint(c)[0] for c in world["ckpts"]],
                                 base=load_checkpoint(base)[0] if base else None,
                                 fishers=[_fisher_dict(f) for f in fishers] if fishers else None)
    assert set(got) == set(expected)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    # and the merge really moved away from every ingredient
    assert not any(torch.equal(got["out_bias"], load_checkpoint(c)[0]["out_bias"]) for c in world["ckpts"])
    assert res.sha256 == file_sha256(out)
    assert os.listdir(world["out"]) == ["m.safetensors"]


def test_output_opens_everywhere_and_records_its_provenance(world):
    out = world["out"] / "m.safetensors"
    res = merge_checkpoints("fisher", world["ckpts"], out, fishers=world["fishers"], weights=[1, 2, 3],
                            options={"normalize": "true"})
    model, meta_ = load_model(out)
    assert meta_.backbone == CFG and meta_.dataset_fingerprint == FINGERPRINT and meta_.n_items == CFG.n_items
    assert meta_.recipe == {"name": "bert4rec"}
    assert meta_.created_by == CREATED_BY
    assert meta_.extra == {"team": "recsys"}  # common metadata is kept, per-ingredient metadata is not
    merge = meta_.merge
    assert merge["method"] == "fisher"
    assert merge["ingredients"] == [file_sha256(c) for c in world["ckpts"]]
    assert merge["base"] is None
    assert merge["weights"] == [1.0, 2.0, 3.0]
    assert merge["options"] == {"normalize": True, "epsilon": 0.0}
    assert [f["checkpoint_sha256"] for f in merge["fishers"]] == merge["ingredients"]
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["merge"]) == merge
        assert set(f.keys()) == set(model.state_dict())
    assert res.bytes_read > 0 and res.stats == {"fallback_entries": 0, "fallback": {}}
    for norm, f in zip(merge["fisher_norms"], world["fishers"]):  # streamed in blocks, float64-accurate
        exact = sum(float(t.double().square().sum()) for t in _fisher_dict(f).values()) ** 0.5
        assert norm == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("chunk_bytes", [32 << 20, 100])
def test_the_fallback_stat_names_the_rows_the_streamed_merge_fell_back_on(world, chunk_bytes):
    # Rows 0 and 7 of the item table and one output bias entry carry no Fisher mass in any ingredient;
    # read in blocks of a few rows, the stat must still give the rows' places in the whole tensor.
    fishers = []
    for i, c in enumerate(world["ckpts"]):
        f = _fisher_dict(world["fishers"][i])
        f["item_emb.weight"][[0, 7]] = 0
        f["out_bias"][4] = 0
        fishers.append(world["src"] / f"z{i}.safetensors")
        make_fisher(fishers[-1], c, seed=i, fisher=f)
    out = world["out"] / "m.safetensors"
    res = merge_checkpoints("fisher", world["ckpts"], out, fishers=fishers, chunk_bytes=chunk_bytes)
    hidden = CFG.hidden
    assert res.stats == {"fallback_entries": 2 * hidden + 1,
                         "fallback": {"item_emb.weight": {"entries": 2 * hidden, "zero": 2 * hidden,
                                                          "rows": {0: hidden, 7: hidden}},
                                      "out_bias": {"entries": 1, "zero": 1, "rows": {}}}}
    got, _ = load_checkpoint(out)
    states = [load_checkpoint(c)[0] for c in world["ckpts"]]
    # there the merge is the plain average
    assert torch.allclose(got["item_emb.weight"][7], sum(s["item_emb.weight"][7] for s in states) / 3)
    assert torch.allclose(got["out_bias"][4], sum(s["out_bias"][4] for s in states) / 3)


def test_task_vector_merge_records_the_base_and_differing_recipes(world, tmp_path):
    other = world["src"] / "cl.safetensors"
    make_checkpoint(other, seed=7, recipe={"name": "cl4srec", "lambda": 0.1})
    out = world["out"] / "m.safetensors"
    merge_checkpoints("ties", [world["ckpts"][0], other], out, base=world["base"])
    _, m = load_checkpoint(out)
    assert m.merge["base"] == file_sha256(world["base"])
    assert m.recipe == {"name": "merge", "ingredients": [{"name": "bert4rec"}, {"name": "cl4srec", "lambda": 0.1}]}


def test_greedy_soup_keeps_models_that_do_not_lower_the_score(world):
    paths = []
    for i, level in enumerate([1.0, 3.0, 10.0]):
        state = tiny_state(i)
        state["out_bias"] = torch.full_like(state["out_bias"], level)
        paths.append(world["src"] / f"g{i}.safetensors")
        make_checkpoint(paths[-1], seed=i, state=state)
    calls = []

    def score(sd):  # best when the output bias averages 2: soups of the first two models
        calls.append(float(sd["out_bias"].mean()))
        return -abs(float(sd["out_bias"].mean()) - 2.0)

    out = world["out"] / "soup.safetensors"
    res = merge_checkpoints("greedy-soup", paths, out, score=score)
    sel = json.loads(res.metadata["merge"])["selection"]
    assert sel["kept"] == [0, 1]  # 0 and 1 tie alone (input order breaks it); 2 would lower the soup
    assert [h["kept"] for h in sel["history"]] == [True, True, False]
    assert calls == pytest.approx([1.0, 3.0, 10.0, 2.0, 14 / 3])
    soup, _ = load_checkpoint(out)
    merge_checkpoints("uniform", paths[:2], world["out"] / "u.safetensors")
    uniform, _ = load_checkpoint(world["out"] / "u.safetensors")
    assert all(torch.equal(soup[k], uniform[k]) for k in soup)


def test_dare_files_are_reproducible_per_seed(world):
    def dare(seed, name):
        return merge_checkpoints("dare", world["ckpts"], world["out"] / name, base=world["base"],
                                 options={"seed": seed}).sha256

    assert dare(1, "a.safetensors") == dare(1, "b.safetensors")
    assert dare(1, "a.safetensors") != dare(2, "c.safetensors")


@pytest.mark.parametrize("sq_norm", [True, False])
def test_progress_reports_each_stage_up_to_one(tmp_path, sq_norm):
    ckpts, fishers, _ = make_merge_inputs(tmp_path, 3, base_seed=99, sq_norm=sq_norm)
    seen = {}
    merge_checkpoints("fisher", ckpts, tmp_path / "m.safetensors", fishers=fishers,
                      options={"normalize": True}, progress=lambda s, f: seen.setdefault(s, []).append(f),
                      chunk_bytes=256)
    # The merge pass hashes the checkpoints as it reads them; only Fishers without sq_norm need a norm pass.
    assert list(seen) == (["merge"] if sq_norm else ["fisher-norms", "merge"])
    for stage, fractions in seen.items():
        assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0), stage
    assert len(seen["merge"]) > 20  # small blocks: many steps


def _header_order(path) -> list[str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: header[k]["data_offsets"])


def _expected_bytes(out, ckpts, base, tensors: dict[str, torch.Tensor]) -> bytes:
    """What the engine wrote before it learnt to hash while merging: a header holding the inputs' sha256
    (from a separate read of each file) in the canonical metadata order, then the merged tensors in the
    first checkpoint's layout."""
    with open(out, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        written = json.loads(f.read(n))["__metadata__"]
    merge = json.loads(written["merge"])
    assert merge["ingredients"] == [file_sha256(c) for c in ckpts]
    assert merge["base"] == (file_sha256(base) if base else None)
    header = {"__metadata__": parse_metadata(written).to_header()}
    off, data = 0, b""
    for name in _header_order(ckpts[0]):
        raw = tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensors[name].shape), "data_offsets": [off, off + len(raw)]}
        off, data = off + len(raw), data + raw
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + data


@pytest.mark.parametrize("chunk_bytes", [32 << 20, 100])
@pytest.mark.parametrize("method, options, weights, scrambled", [
    ("weighted", {}, [1.0, 2.0, 0.5], None),
    ("fisher", {"normalize": True}, [2.0, 1.0, 1.0], None),
    ("ties", {"density": 0.3}, None, None),
    ("dare", {"p": 0.6, "seed": 5}, None, None),
    ("uniform", {}, None, 1),  # an ingredient read out of file order is hashed again on its own
    ("uniform", {}, None, 0),  # the first ingredient sets the order; the others are read out of theirs
    ("task-arithmetic", {"alpha": 0.7}, None, "base"),
])
def test_output_is_byte_for_byte_what_a_separate_hashing_pass_gave(world, method, options, weights, scrambled,
                                                                   chunk_bytes):
    ckpts, base = list(world["ckpts"]), world["base"]
    if scrambled is not None:
        path = world["src"] / "scrambled.safetensors"
        write_scrambled(path, tiny_state(3 if scrambled == "base" else scrambled))
        if scrambled == "base":
            base = path
        else:
            ckpts[scrambled] = path
    m = build_method(method, 3, options, weights)
    base = base if m.needs_base else None
    fishers = world["fishers"] if m.needs_fisher else None
    out = world["out"] / "m.safetensors"
    res = merge_checkpoints(method, ckpts, out, weights=weights, options=options, base=base, fishers=fishers,
                            chunk_bytes=chunk_bytes)
    merged = merge_state_dicts(m, [load_checkpoint(c)[0] for c in ckpts],
                               base=load_checkpoint(base)[0] if base else None,
                               fishers=[_fisher_dict(f) for f in fishers] if fishers else None)
    got = out.read_bytes()
    assert got == _expected_bytes(out, ckpts, base, merged)
    # A fisher merge takes the checkpoints' digests from the Fishers, so its header is final at once and the
    # output is hashed as written; every other method learns them in the pass and reads its output back.
    assert res.sha256 == file_sha256(out) and res.output_reread == (0 if fishers else len(got))
    assert os.listdir(world["out"]) == ["m.safetensors"]
    # Each checkpoint (and base) is read once, whole, by the merge pass that hashes it; one whose layout differs
    # from the first checkpoint's is read out of file order, so it is hashed by a second, separate read.
    out_of_order = {ckpts[1], ckpts[2]} if scrambled == 0 else {world["src"] / "scrambled.safetensors"}
    expected = 0
    for p in [*ckpts, *([base] if base else [])]:
        size = os.path.getsize(p)
        expected += size + sum(t.nbytes for t in load_checkpoint(p)[0].values()) if p in out_of_order else size
    for f in fishers or []:  # not hashed: their tensor bytes, once (normalize takes the norms from sq_norm)
        expected += sum(t.nbytes for t in _fisher_dict(f).values())
    assert res.bytes_read == expected


@pytest.mark.parametrize("chunk_bytes", [32 << 20, 100])
def test_normalized_fisher_merge_reads_each_input_once_and_old_fishers_give_the_same_file(tmp_path, chunk_bytes):
    """With sq_norm in the Fishers every input byte is read once; Fishers written before the field give the
    same file, byte for byte, at the cost of a second read of each Fisher for its norm."""
    new, old = tmp_path / "new", tmp_path / "old"
    new.mkdir(), old.mkdir()
    ckpts, fishers, _ = make_merge_inputs(new, 3, base_seed=99)
    old_fishers = [old / f.name for f in fishers]
    for i, (f, c) in enumerate(zip(old_fishers, ckpts)):
        make_fisher(f, c, seed=i, sq_norm=False)
        assert "sq_norm" in _fisher_meta(fishers[i]) and "sq_norm" not in _fisher_meta(f)
    kw = {"weights": [2.0, 1.0, 1.0], "options": {"normalize": True}, "chunk_bytes": chunk_bytes}
    res = merge_checkpoints("fisher", ckpts, tmp_path / "a.safetensors", fishers=fishers, **kw)
    res_old = merge_checkpoints("fisher", ckpts, tmp_path / "b.safetensors", fishers=old_fishers, **kw)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    ckpt_bytes = sum(os.path.getsize(c) for c in ckpts)  # whole files: the merge pass hashes them
    fisher_bytes = sum(t.nbytes for f in fishers for t in _fisher_dict(f).values())
    assert res.bytes_read == ckpt_bytes + fisher_bytes
    assert res_old.bytes_read == ckpt_bytes + 2 * fisher_bytes


def _fisher_meta(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


# ---- refusals: each names its reason and leaves the output directory empty -------------------------

def _nan_last_tensor(path, value):
    """A checkpoint whose last tensor in file order is poisoned, so the merge is mid-write when it sees it."""
    state = tiny_state(5)
    with safe_open(str(path.parent / "c0.safetensors"), "pt") as f:
        last = list(f.keys())[-1]
    state[last] = state[last].clone()
    state[last].view(-1)[3] = value
    write_raw(path, state)
    return last


def _setup(case, w):
    """(kwargs for merge_checkpoints, expected error, message pattern) for one bad-input case."""
    src, ckpts, fishers = w["src"], [str(c) for c in w["ckpts"]], [str(f) for f in w["fishers"]]
    bad = src / "bad.safetensors"
    kw = {"method": "uniform", "checkpoints": ckpts[:2]}
    if case == "backbone":
        make_checkpoint(bad, 1, cfg=BackboneConfig(n_items=30, hidden=8, layers=1, heads=2, inner=16, max_len=12))
        return kw | {"checkpoints": [ckpts[0], str(bad)]}, IncompatibleError, "backbone max_len=12, but .* has 10"
    if case == "n_items":
        make_checkpoint(bad, 1, cfg=BackboneConfig(n_items=31, hidden=8, layers=1, heads=2, inner=16, max_len=10))
        return kw | {"checkpoints": [ckpts[0], str(bad)]}, IncompatibleError, "n_items=31"
    if case == "fingerprint":
        make_checkpoint(bad, 1, fingerprint="cd" * 32)
        return kw | {"checkpoints": [ckpts[0], str(bad)]}, IncompatibleError, "dataset_fingerprint cdcd"
    if case == "base-fingerprint":
        make_checkpoint(bad, 1, fingerprint="cd" * 32)
        return (kw | {"method": "task-arithmetic", "base": str(bad)}, IncompatibleError,
                "bad.safetensors: dataset_fingerprint")
    if case == "missing-tensor":
        state = tiny_state(1)
        del state["head.bias"]
        make_checkpoint(bad, 1, state=state)
        # The file disagrees with its own backbone: admission refuses it before it is compared with the others.
        return (kw | {"checkpoints": [ckpts[0], str(bad)]}, CheckpointError,
                r"bad.safetensors: tensor names do not match the backbone \(missing \['head.bias'\]")
    if case == "shape":
        state = tiny_state(1)
        state["out_bias"] = torch.zeros(31)
        write_raw(bad, state)
        return (kw | {"checkpoints": [ckpts[0], str(bad)]}, CheckpointError,
                r"bad.safetensors: tensor 'out_bias' has shape \(31,\), the backbone expects \(30,\)")
    if case == "dtype":
        make_checkpoint(bad, 1, state={k: v.half() for k, v in tiny_state(1).items()})
        return kw | {"checkpoints": [ckpts[0], str(bad)]}, IncompatibleError, "dtype torch.float16"
    if case == "nan":
        name = _nan_last_tensor(bad, float("nan"))
        return kw | {"checkpoints": [ckpts[0], str(bad)]}, CheckpointError, f"tensor '{name}' contains NaN or Inf"
    if case == "inf-base":
        name = _nan_last_tensor(bad, float("inf"))
        return (kw | {"method": "ties", "base": str(bad)}, CheckpointError,
                f"bad.safetensors: tensor '{name}' contains NaN or Inf")
    fisher_kw = kw | {"method": "fisher", "fishers": fishers[:2]}
    if case == "fisher-of-another-checkpoint":
        return fisher_kw | {"fishers": [fishers[1], fishers[0]]}, IncompatibleError, "computed for checkpoint sha256"
    if case == "fisher-fingerprint":
        make_fisher(bad, ckpts[1], 1, fingerprint="cd" * 32)
        return fisher_kw | {"fishers": [fishers[0], str(bad)]}, IncompatibleError, "Fisher dataset_fingerprint"
    if case == "fisher-shape":
        f = {k: v.clone() for k, v in _fisher_dict(fishers[1]).items()}
        f["out_bias"] = torch.ones(29)
        make_fisher(bad, ckpts[1], 1, fisher=f)
        return fisher_kw | {"fishers": [fishers[0], str(bad)]}, IncompatibleError, "'out_bias' has shape"
    if case == "fisher-names":
        f = _fisher_dict(fishers[1])
        f["extra.weight"] = f.pop("head.weight")
        make_fisher(bad, ckpts[1], 1, fisher=f)
        return fisher_kw | {"fishers": [fishers[0], str(bad)]}, IncompatibleError, "'head.weight' is missing"
    if case.startswith("fisher-sq-norm-"):  # a tampered field, refused before anything is written
        value = {"nan": "nan", "inf": "inf", "negative": "-2.5", "garbage": "0x1p3 or so"}[case.split("-")[-1]]
        make_fisher(bad, ckpts[1], 1, sq_norm=value)
        return (fisher_kw | {"fishers": [fishers[0], str(bad)], "options": {"normalize": True}}, CheckpointError,
                "bad.safetensors: Fisher metadata sq_norm=" + re.escape(repr(value)))
    if case in ("fisher-zero", "fisher-zero-without-sq-norm"):  # as before sq_norm: no norm to divide by
        make_fisher(bad, ckpts[1], 1, fisher={k: torch.zeros_like(v) for k, v in _fisher_dict(fishers[1]).items()},
                    sq_norm=case == "fisher-zero")
        assert ("sq_norm" in _fisher_meta(bad)) == (case == "fisher-zero")
        return (fisher_kw | {"fishers": [fishers[0], str(bad)], "options": {"normalize": True}}, MergeOptionsError,
                "Fisher 2 is zero everywhere")
    if case in ("fisher-inf", "fisher-inf-normalized", "fisher-negative"):
        f = {k: v.clone() for k, v in _fisher_dict(fishers[1]).items()}
        last = list(f)[-1]
        f[last].view(-1)[0] = -1.0 if case == "fisher-negative" else float("inf")
        make_fisher(bad, ckpts[1], 1, fisher=f)
        options = {"normalize": case == "fisher-inf-normalized"}
        why = "has negative entries" if case == "fisher-negative" else "contains NaN or Inf"
        return (fisher_kw | {"fishers": [fishers[0], str(bad)], "options": options}, CheckpointError,
                f"tensor '{last}' {why}")
    if case == "negative-weight":
        return kw | {"method": "weighted", "weights": [1.0, -0.5]}, IncompatibleError, "model 2 option 'weight'"
    if case == "zero-weights":
        return kw | {"method": "weighted", "weights": [0.0, 0.0]}, IncompatibleError, "weights sum to 0"
    if case == "no-base":
        return kw | {"method": "task-arithmetic"}, IncompatibleError, "needs a base checkpoint"
    if case == "no-fisher":
        return kw | {"method": "fisher"}, IncompatibleError, "needs one Fisher file per checkpoint"
    if case == "no-score":
        return kw | {"method": "greedy-soup"}, IncompatibleError, "needs a score function"
    if case == "pickle":
        pt = src / "model.pt"
        pt.write_bytes(b"PK\x03\x04 not for us")
        return kw | {"checkpoints": [ckpts[0], str(pt)]}, CheckpointError, "pickled checkpoints"
    if case == "pickle-renamed":
        bad.write_bytes(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x01a\x94K\x01u.")
        return kw | {"checkpoints": [ckpts[0], str(bad)]}, CheckpointError, "not a safetensors file"
    if case == "not-recmerge":
        from safetensors.torch import save_file

        save_file(tiny_state(1), str(bad))
        return kw | {"checkpoints": [ckpts[0], str(bad)]}, CheckpointError, "not a recmerge checkpoint"
    if case == "overwrite-input":
        return kw | {"out": ckpts[1]}, IncompatibleError, "would overwrite the input"
    raise AssertionError(case)


BAD_CASES = ["backbone", "n_items", "fingerprint", "base-fingerprint", "missing-tensor", "shape", "dtype", "nan",
             "inf-base", "fisher-of-another-checkpoint", "fisher-fingerprint", "fisher-shape", "fisher-names",
             "fisher-inf", "fisher-inf-normalized", "fisher-negative", "fisher-sq-norm-nan", "fisher-sq-norm-inf",
             "fisher-sq-norm-negative", "fisher-sq-norm-garbage", "fisher-zero", "fisher-zero-without-sq-norm",
             "negative-weight", "zero-weights",
             "no-base", "no-fisher", "no-score", "pickle", "pickle-renamed", "not-recmerge", "overwrite-input"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_inputs_are_refused_and_leave_nothing(world, case):
    kw, error, message = _setup(case, world)
    before_inputs = sorted(os.listdir(world["src"]))
    kw.setdefault("out", world["out"] / "m.safetensors")
    if "base" not in kw and case not in ("no-base",) and kw["method"] in ("ties", "task-arithmetic", "dare"):
        kw["base"] = str(world["base"])
    seen = []  # (stage, what the output directory held) at every progress report

    def progress(stage, fraction):
        seen.append((stage, os.listdir(world["out"])))

    with pytest.raises(error, match=message):
        merge_checkpoints(kw.pop("method"), kw.pop("checkpoints"), chunk_bytes=64, progress=progress, **kw)
    assert os.listdir(world["out"]) == []
    assert sorted(os.listdir(world["src"])) == before_inputs  # nothing written beside the inputs either
    if case in ("nan", "inf-base", "fisher-inf", "fisher-negative"):
        assert any(stage == "merge" for stage, _ in seen)  # found while blocks were already being written...
    if sys.platform == "linux":
        assert all(listing == [] for _, listing in seen)  # ...yet the directory never held a file (O_TMPFILE)


def test_a_merge_can_be_merged_again(world):
    first = world["out"] / "first.safetensors"
    merge_checkpoints("uniform", world["ckpts"][:2], first)
    second = world["out"] / "second.safetensors"
    merge_checkpoints("weighted", [first, world["ckpts"][2]], second, weights=[2, 1])
    got, m = load_checkpoint(second)
    a, b, c = (load_checkpoint(p)[0] for p in world["ckpts"])
    torch.testing.assert_close(got["out_bias"], (a["out_bias"] + b["out_bias"] + c["out_bias"]) / 3)
    assert m.merge["ingredients"][0] == file_sha256(first)


def test_half_precision_inputs_merge_in_float32_and_keep_their_dtype(world):
    paths = []
    for i in range(2):
        paths.append(world["src"] / f"h{i}.safetensors")
        make_checkpoint(paths[-1], i, state={k: v.bfloat16() for k, v in tiny_state(i).items()})
    out = world["out"] / "m.safetensors"
    merge_checkpoints("weighted", paths, out, weights=[1, 3])
    got, _ = load_checkpoint(out)
    a, b = (load_checkpoint(p)[0] for p in paths)
    assert got["head.weight"].dtype == torch.bfloat16
    expected = ((a["head.weight"].float() + 3 * b["head.weight"].float()) / 4).bfloat16()
    assert torch.equal(got["head.weight"], expected)



# --- digests the caller already knows (the store) ------------------------------------------------------
@pytest.mark.parametrize("method, options, with_base", [("fisher", {"normalize": True}, False),
                                                         ("ties", {"density": 0.5}, True),
                                                         ("greedy-soup", {}, False)])
def test_given_digests_give_the_same_file_without_reading_it_back(world, method, options, with_base):
    kw = {"options": options, "chunk_bytes": 100}
    if method == "fisher":
        kw["fishers"] = world["fishers"]
    if with_base:
        kw["base"] = world["base"]
    if method == "greedy-soup":
        kw["score"] = lambda sd: float(sd["out_bias"].sum())
    inputs = world["ckpts"] + ([world["base"]] if with_base else [])
    plain = merge_checkpoints(method, world["ckpts"], world["out"] / "plain.safetensors", **kw)
    given = merge_checkpoints(method, world["ckpts"], world["out"] / "given.safetensors",
                              sha256s=[file_sha256(p) for p in inputs], **kw)
    assert (world["out"] / "given.safetensors").read_bytes() == (world["out"] / "plain.safetensors").read_bytes()
    assert given.sha256 == plain.sha256 == file_sha256(world["out"] / "given.safetensors")
    assert given.output_reread == 0
    # Without digests, ties learns them in the pass and reads its output back; fisher takes them from the
    # Fishers; greedy soup hashes its inputs apart from the merge pass either way.
    assert (plain.output_reread > 0) == (method == "ties")


def test_a_given_digest_that_does_not_match_is_refused_and_leaves_nothing(world):
    digests = [file_sha256(p) for p in world["ckpts"]]
    digests[1] = "ab" * 32
    with pytest.raises(CheckpointError, match=r"c1\.safetensors: its sha256 is .*, but abababababab… was given"):
        merge_checkpoints("weighted", world["ckpts"], world["out"] / "m.safetensors", weights=[1, 2, 3],
                          sha256s=digests, chunk_bytes=100)
    assert os.listdir(world["out"]) == []


def test_with_given_digests_a_fisher_of_another_checkpoint_is_refused_before_the_merge_pass(world):
    stages = []
    fishers = [world["fishers"][1], world["fishers"][0], world["fishers"][2]]  # 0 and 1 swapped
    with pytest.raises(IncompatibleError, match="Fisher was computed for checkpoint sha256"):
        merge_checkpoints("fisher", world["ckpts"], world["out"] / "m.safetensors", fishers=fishers,
                          sha256s=[file_sha256(p) for p in world["ckpts"]],
                          progress=lambda stage, f: stages.append(stage))
    assert "merge" not in stages and os.listdir(world["out"]) == []


@pytest.mark.parametrize("bad", [["0" * 64], ["0" * 64] * 2 + ["xyz"], ["0" * 63] * 3, ["A" * 64] * 3])
def test_malformed_digest_lists_are_refused(world, bad):
    with pytest.raises(MergeOptionsError, match="sha256s: expected 3 sha256 hex digests"):
        merge_checkpoints("uniform", world["ckpts"], world["out"] / "m.safetensors", sha256s=bad)
    assert os.listdir(world["out"]) == []
