"""Fisher estimation (SPEC §5): every computation against plain autograd loops on tiny models, and the
file, cache and refusal contracts of estimate_fisher."""

from __future__ import annotations

import json

import pytest
import torch

from app.cli import main as cli_main
from merging.fisher import FORMAT, estimate_fisher, fisher_from_sequences, load_fisher, parse_settings
from merging.fisher_compute import compute_fisher
from merging.io import SafetensorsReader
from merging.item_selection import select_items
from merging.merge import file_sq_norm, merge_checkpoints
from models.backbone import SeqRecModel
from models.batching import length_batches, pad_left
from models.checkpoint import CheckpointMeta, atomic_save, file_sha256, load_checkpoint, load_model, save_checkpoint
from models.config import BackboneConfig
from models.errors import IncompatibleError, RecmergeError
from tests.merging.tiny_fisher import HIDDEN, N_ITEMS, SELECTIONS, SEQS, TARGETS, tiny_model
from tests.synthetic import make_planted_dataset


def log_probs(model: SeqRecModel, seq) -> torch.Tensor:  # (n_items,) log p(.|seq), with a graph
    return torch.log_softmax(model.next_item_scores(pad_left([seq])), dim=-1)[0]


def selection(model, i, lp, sampling, n, seed=0):
    return select_items(lp.exp()[None].detach(), sampling, n, torch.tensor([TARGETS[i]]), [i], seed)


def brute_per_example(model, sampling, n, seed=0) -> dict[str, torch.Tensor]:
    """Σ_i Σ_j w_ij (∇ log p(v_ij|s_i))², one autograd call per (sequence, item)."""
    params = dict(model.named_parameters())
    out = {k: torch.zeros_like(v) for k, v in params.items()}
    for i, seq in enumerate(SEQS):
        lp = log_probs(model, seq)
        cols, w = selection(model, i, lp, sampling, n, seed)
        for c, wt in zip(cols[0].tolist(), w[0].tolist()):
            for k, g in zip(params, torch.autograd.grad(lp[c], list(params.values()), retain_graph=True)):
                out[k] += wt * g.square()
    return out


def brute_batchwise(model, sampling, n, batch_size) -> dict[str, torch.Tensor]:
    """Thesis eq. 3.10: per batch and rank r, (Σ_i w_ir) (∇ Σ_i log p(v_ir|s_i))²."""
    params = dict(model.named_parameters())
    out = {k: torch.zeros_like(v) for k, v in params.items()}
    for idx in length_batches([len(s) for s in SEQS], batch_size):
        lps = [log_probs(model, SEQS[i]) for i in idx]
        sels = [selection(model, i, lp, sampling, n) for i, lp in zip(idx, lps)]
        for r in range(sels[0][0].shape[1]):
            total = sum(lp[cols[0, r]] for lp, (cols, _) in zip(lps, sels))
            weight = sum(w[0, r] for _, w in sels)
            for k, g in zip(params, torch.autograd.grad(total, list(params.values()), retain_graph=True)):
                out[k] += weight * g.square()
    return out


def assert_close(got: dict, ref: dict, rtol: float = 1e-5) -> None:
    assert got.keys() == ref.keys()
    for k in ref:
        scale = ref[k].abs().max().item()
        assert scale > 0, k  # every parameter has some gradient on this data
        err = (got[k].double() - ref[k]).abs().max().item()
        assert err <= rtol * scale, f"{k}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("kind", ["bert4rec", "sasrec"])
@pytest.mark.parametrize("sampling,n", SELECTIONS)
def test_per_example_equals_brute_force(kind, sampling, n):
    model = tiny_model(kind)
    got = compute_fisher(model, SEQS, TARGETS, sampling=sampling, n=n, batch_size=3)
    assert_close(got, brute_per_example(model, sampling, n))


@pytest.mark.parametrize("kind", ["bert4rec", "sasrec"])
@pytest.mark.parametrize("sampling,n", [("exact", None), ("topk", 12), ("model", 6), ("target", None)])
@pytest.mark.parametrize("design", [{"positions": "start"}, {"norm": "sasrec"}, {"norm": "pre", "head": False}])
def test_per_example_equals_brute_force_in_other_designs(kind, sampling, n, design):
    # positions from the start: each sequence's tokens sit at other rows of the position table than its
    # batch-mates' (and its padding at row 0); the sasrec block reads its qkv projection twice per token.
    model = tiny_model(kind, **design)
    got = compute_fisher(model, SEQS, TARGETS, sampling=sampling, n=n, batch_size=3)
    assert_close(got, brute_per_example(model, sampling, n))


@pytest.mark.parametrize("kind", ["bert4rec", "sasrec"])
@pytest.mark.parametrize("sampling,n", [("exact", None), ("topk", 5), ("model", 6), ("target", None)])
def test_batchwise_is_eq_3_10(kind, sampling, n):
    model = tiny_model(kind, seed=1)
    got = compute_fisher(model, SEQS, TARGETS, sampling=sampling, n=n, batch_size=3, computation="batchwise")
    assert_close(got, brute_batchwise(model, sampling, n, batch_size=3))
    per_example = compute_fisher(model, SEQS, TARGETS, sampling=sampling, n=n, batch_size=3)
    # With several sequences per batch the cross terms between them make it a different estimate...
    assert (got["blocks.0.attn.qkv.weight"] - per_example["blocks.0.attn.qkv.weight"]).abs().max() > 1e-3
    # ...and with one sequence per batch there are none.
    single = compute_fisher(model, SEQS, TARGETS, sampling=sampling, n=n, batch_size=1, computation="batchwise")
    assert_close(single, {k: v.double() for k, v in per_example.items()})


def test_per_example_does_not_depend_on_batching():
    model = tiny_model("bert4rec")
    a = compute_fisher(model, SEQS, TARGETS, sampling="model", n=5, batch_size=2, seed=3)
    b = compute_fisher(model, SEQS, TARGETS, sampling="model", n=5, batch_size=7, seed=3)
    assert_close(a, {k: v.double() for k, v in b.items()})
    c = compute_fisher(model, SEQS, TARGETS, sampling="model", n=5, batch_size=7, seed=4)
    assert not torch.allclose(b["out_bias"], c["out_bias"])  # the seed does matter


def test_selections():
    probs = torch.softmax(torch.randn(4, N_ITEMS, generator=torch.Generator().manual_seed(0)), dim=1)
    cols, w = select_items(probs, "random", 6, keys=[10, 11, 12, 13], seed=5)
    assert all(len(set(row.tolist())) == 6 for row in cols)  # without replacement
    assert torch.equal(w, probs.gather(1, cols))
    again, _ = select_items(probs[[2, 0]], "random", 6, keys=[12, 10], seed=5)
    assert torch.equal(again, cols[[2, 0]])  # a row's draw depends on its key, not on its batch
    other, _ = select_items(probs, "random", 6, keys=[10, 11, 12, 13], seed=6)
    assert not torch.equal(other, cols)
    cols, w = select_items(probs, "topk", 3)
    assert torch.equal(w[:, 0], probs.max(dim=1).values) and (w[:, :-1] >= w[:, 1:]).all()
    cols, w = select_items(probs, "model", 8, keys=range(4))
    assert torch.allclose(w.sum(1), torch.ones(4, dtype=w.dtype)) and cols.shape == (4, 8)
    peaked = torch.full((1, N_ITEMS), 1e-9)
    peaked[0, 7] = 1.0
    assert (select_items(peaked, "model", 12, keys=[0])[0] == 7).all()  # draws follow p (with replacement)
    cols, w = select_items(probs, "target", targets=torch.tensor([1, 5, 9, 16]))
    assert cols[:, 0].tolist() == [0, 4, 8, 15] and (w == 1).all()
    cols, w = select_items(probs, "exact")
    assert cols.shape == (4, N_ITEMS) and torch.equal(w, probs)


def test_eval_mode_and_model_state_restored():
    model = tiny_model("bert4rec").train()  # dropout 0.3 would make every pass different
    model.head.weight.requires_grad_(False)
    fisher = compute_fisher(model, SEQS, TARGETS, sampling="topk", n=4)
    assert model.training and not model.head.weight.requires_grad and model.item_emb.weight.requires_grad
    model.head.weight.requires_grad_(True)
    assert_close(fisher, brute_per_example(model.eval(), "topk", 4))


def test_fisher_from_sequences_averages_over_sequences():
    model = tiny_model("sasrec")
    total = compute_fisher(model, SEQS, TARGETS, sampling="target")
    mean = fisher_from_sequences(model, SEQS, TARGETS, {"sampling": "target"})
    assert all(torch.allclose(mean[k] * len(SEQS), total[k]) for k in total)


# --- files, cache, refusals ----------------------------------------------------------------------------


@pytest.fixture
def planted(tmp_path):
    ds = make_planted_dataset(tmp_path, n_users=12, n_items=N_ITEMS, min_len=5, max_len=12)
    torch.manual_seed(0)
    cfg = BackboneConfig(n_items=ds.n_items, hidden=HIDDEN, layers=1, heads=2, inner=16, max_len=10)
    ckpt = tmp_path / "model.safetensors"
    save_checkpoint(ckpt, SeqRecModel(cfg).state_dict(),
                    CheckpointMeta(backbone=cfg, recipe={"name": "bert4rec"}, dataset_fingerprint=ds.fingerprint,
                                   n_items=ds.n_items))
    return ds, ckpt


def test_estimate_writes_a_fisher_shaped_like_the_checkpoint(planted, tmp_path):
    ds, ckpt = planted
    out = tmp_path / "f.safetensors"
    res = estimate_fisher(ckpt, ds, {"sampling": "target"}, out=out, device="cpu")
    assert res.path == out and not res.cached
    fisher, head = load_fisher(out)
    state, _ = load_checkpoint(ckpt)
    assert {k: v.shape for k, v in fisher.items()} == {k: v.shape for k, v in state.items()}
    assert all(v.dtype == torch.float32 for v in fisher.values())
    assert head["format"] == FORMAT and head["checkpoint_sha256"] == file_sha256(ckpt)
    assert head["dataset_fingerprint"] == ds.fingerprint
    assert (head["sampling"], head["n"], head["computation"], head["seed"]) == ("target", "none", "per-example", "0")
    assert head["examples"] == str(ds.n_users) and head["created_by"]
    assert json.loads(head["settings"])["sampling"] == "target"
    with SafetensorsReader(out) as r:  # the norm a merge would compute from the file, to the last bit
        assert float(head["sq_norm"]).hex() == file_sq_norm(r, 100, lambda f: None).hex()
    # The definition: s_i = training sequence without its last item, target = that last item.
    model = load_model(ckpt)[0].double()
    params = dict(model.named_parameters())
    ref = {k: torch.zeros_like(v) for k, v in params.items()}
    for seq in ds.train_sequences():
        lp = log_probs(model, seq[:-1])
        for k, g in zip(params, torch.autograd.grad(lp[int(seq[-1]) - 1], list(params.values()))):
            ref[k] += g.square() / ds.n_users
    assert_close(fisher, ref)


def test_cache_reuses_the_file(planted, tmp_path):
    ds, ckpt = planted
    cache = tmp_path / "cache"
    settings = {"sampling": "topk", "n": 3, "batch_size": 4}
    first = estimate_fisher(ckpt, ds, settings, cache_dir=cache)
    stamp = first.path.stat().st_mtime_ns
    again = estimate_fisher(ckpt, ds, {**settings, "batch_size": 9}, cache_dir=cache)  # speed knob only
    assert again.cached and again.path == first.path and first.path.stat().st_mtime_ns == stamp
    copy = estimate_fisher(ckpt, ds, settings, cache_dir=cache, out=tmp_path / "copy.safetensors")
    assert copy.cached and copy.path.read_bytes() == first.path.read_bytes()
    other = estimate_fisher(ckpt, ds, {**settings, "n": 4}, cache_dir=cache)
    assert not other.cached and other.path != first.path
    first.path.write_bytes(first.path.read_bytes()[:-16])  # a truncated cache entry is not trusted
    redo = estimate_fisher(ckpt, ds, settings, cache_dir=cache)
    assert not redo.cached and load_fisher(redo.path)[0].keys() == load_fisher(other.path)[0].keys()


def test_a_cached_fisher_written_before_sq_norm_is_still_used(planted, tmp_path):
    ds, ckpt = planted
    cache = tmp_path / "cache"
    fresh = estimate_fisher(ckpt, ds, {"sampling": "target"}, cache_dir=cache, out=tmp_path / "fresh.safetensors")
    tensors, head = load_fisher(fresh.path)
    del head["sq_norm"]
    atomic_save(tensors, cache / next(p.name for p in cache.iterdir()), head)  # as the cache held it before
    old = estimate_fisher(ckpt, ds, {"sampling": "target"}, cache_dir=cache)
    assert old.cached and "sq_norm" not in old.metadata
    merged = [merge_checkpoints("fisher", [ckpt, ckpt], tmp_path / f"{name}.safetensors", fishers=[f, f],
                                weights=[1, 2], options={"normalize": True}) for name, f in
              [("new", fresh.path), ("old", old.path)]]
    assert merged[0].sha256 == merged[1].sha256  # the old entry's norm is computed from the file, to the last bit
    assert merged[1].bytes_read - merged[0].bytes_read == 2 * sum(t.nbytes for t in tensors.values())


def test_refuses_a_checkpoint_of_another_dataset(planted, tmp_path):
    ds, ckpt = planted
    state, meta = load_checkpoint(ckpt)
    meta.dataset_fingerprint = "0" * 64
    foreign = tmp_path / "foreign.safetensors"
    save_checkpoint(foreign, state, meta)
    with pytest.raises(IncompatibleError, match="fingerprint"):
        estimate_fisher(foreign, ds, {"sampling": "target"}, out=tmp_path / "f.safetensors")
    assert not (tmp_path / "f.safetensors").exists()


@pytest.mark.parametrize("settings,field", [
    ({"sampling": "topk"}, "n is required"),
    ({"sampling": "exact", "n": 5}, "n applies"),
    ({"sampling": "random", "n": 0}, "n:"),
    ({"sampling": "nearest", "n": 3}, "sampling:"),
    ({"sampling": "target", "batch_size": 0}, "batch_size:"),
    ({"sampling": "target", "computation": "exact"}, "computation:"),
    ({"sampling": "target", "max_users": 0}, "max_users:"),
    ({"sampling": "target", "colour": 1}, "colour: unknown field"),
])
def test_settings_are_validated_up_front(settings, field):
    with pytest.raises(RecmergeError, match=field):
        parse_settings(settings)


def test_n_beyond_the_catalogue_and_max_users(planted, tmp_path):
    ds, ckpt = planted
    with pytest.raises(RecmergeError, match=f"n={N_ITEMS + 1} exceeds"):
        estimate_fisher(ckpt, ds, {"sampling": "topk", "n": N_ITEMS + 1}, out=tmp_path / "f.safetensors")
    a = estimate_fisher(ckpt, ds, {"sampling": "random", "n": 2, "max_users": 5}, out=tmp_path / "a.safetensors")
    b = estimate_fisher(ckpt, ds, {"sampling": "random", "n": 2, "max_users": 5}, out=tmp_path / "b.safetensors")
    assert a.metadata["examples"] == "5" and a.path.read_bytes() == b.path.read_bytes()


def test_cli(planted, tmp_path, capsys):
    ds, ckpt = planted
    out = tmp_path / "cli.safetensors"
    rc = cli_main(["fisher", str(ckpt), "--data", str(ds.path), "--sampling", "model", "--n", "3",
                   "--batch-size", "5", "--out", str(out)])
    assert rc == 0 and load_fisher(out)[1]["sampling"] == "model"
    assert str(out) in capsys.readouterr().out
    rc = cli_main(["fisher", str(ckpt), "--data", str(ds.path), "--sampling", "topk", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "n is required" in err and "Traceback" not in err and err.count("\n") == 1
