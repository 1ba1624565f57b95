"""regmean against its definition on tiny checkpoints: with α = 1 every linear weight is the least-squares
minimiser of Σ_i ‖X_i W − X_i W_i‖², computed here directly from the stacked inputs (torch.linalg.lstsq);
every other tensor is the plain average; refusals leave nothing behind. The Gram matrices that
core/merge_inputs.py gathers with forward hooks are checked against inputs recomputed by hand."""

import os

import pytest
import torch

from merging.merge import build_method, merge_checkpoints, merge_state_dicts
from merging.methods import MergeOptionsError
from merging.methods.base import FitInputs
from models.checkpoint import load_checkpoint
from tests.merging.factory import merge_world


@pytest.fixture
def world(tmp_path):
    world = merge_world(tmp_path, 3)
    states = world["states"]
    linear = [k for k, v in states[0].items() if v.dim() == 2 and k.startswith("blocks.")]
    # Each model's own inputs to each linear layer: a different number of rows per model, more rows than
    # inputs, so each G_i is invertible and the sum weighs the models unequally.
    gen = torch.Generator().manual_seed(5)
    inputs = [{k: torch.randn(40 + 13 * i, states[0][k].shape[1], generator=gen, dtype=torch.float64)
               * (1.0 + i) for k in linear} for i in range(3)]
    return {**world, "linear": linear, "inputs": inputs}


def grams_of(world):
    def grams(state):
        # Which model this is: its output bias is its own.
        i = next(j for j, s in enumerate(world["states"]) if torch.equal(s["out_bias"], state["out_bias"]))
        return {k: x.T @ x for k, x in world["inputs"][i].items()}

    return grams


def test_alpha_one_is_the_least_squares_minimiser_of_the_stacked_inputs(world):
    out = world["out"] / "m.safetensors"
    res = merge_checkpoints("regmean", world["ckpts"], out, grams=grams_of(world), options={"alpha": 1, "ridge": 0})
    merged, _ = load_checkpoint(out)
    states = world["states"]
    for k in world["linear"]:
        xs = [inp[k] for inp in world["inputs"]]
        a = torch.cat(xs)
        b = torch.cat([x @ s[k].double().T for x, s in zip(xs, states)])
        want = torch.linalg.lstsq(a, b).solution.T
        torch.testing.assert_close(merged[k].double(), want, rtol=1e-4, atol=1e-6)
        # ...and it is not just the plain average (the test would be empty otherwise).
        assert not torch.allclose(merged[k], sum(s[k] for s in states) / 3, atol=1e-4)
    for k in set(merged) - set(world["linear"]):
        torch.testing.assert_close(merged[k], sum(s[k] for s in states) / 3)
    assert res.fitted["solved"] == sorted(world["linear"])


def test_alpha_shrinks_the_off_diagonal_and_equal_grams_give_the_average(world):
    states = world["states"][:2]
    k = world["linear"][0]
    x = world["inputs"][0][k]
    same = FitInputs(grams=lambda sd: {k: x.T @ x})
    got = merge_state_dicts(build_method("regmean", 2, {"alpha": 0.5, "ridge": 0}), states, inputs=same)
    torch.testing.assert_close(got[k], (states[0][k] + states[1][k]) / 2)  # G_1 = G_2: any α gives the mean
    # With the off-diagonal gone (alpha → diagonal only), column j of W (input j) is weighted by G_i[j, j].
    g = [inp[k].T @ inp[k] for inp in world["inputs"][:2]]
    diag = FitInputs(grams=lambda sd: {k: g[0] if torch.equal(sd["out_bias"], states[0]["out_bias"]) else g[1]})
    got = merge_state_dicts(build_method("regmean", 2, {"alpha": 1e-12, "ridge": 0}), states, inputs=diag)
    d = [torch.diagonal(gi) for gi in g]
    want = (states[0][k].double() * d[0] + states[1][k].double() * d[1]) / (d[0] + d[1])
    torch.testing.assert_close(got[k].double(), want, rtol=1e-4, atol=1e-6)


def test_the_ridge_gives_unreached_inputs_the_plain_average(world):
    states = world["states"][:2]
    k = world["linear"][0]
    n_in = states[0][k].shape[1]
    # Only the first 3 input directions are ever reached: the summed Gram matrix is singular.
    xs = [world["inputs"][i][k].clone() for i in range(2)]
    for x in xs:
        x[:, 3:] = 0
    grams = FitInputs(grams=lambda sd: {k: (xs[0] if torch.equal(sd["out_bias"], states[0]["out_bias"])
                                            else xs[1]).T @ (xs[0] if torch.equal(sd["out_bias"],
                                                                                  states[0]["out_bias"]) else xs[1])})
    with pytest.raises(MergeOptionsError, match="singular; give a ridge > 0"):
        merge_state_dicts(build_method("regmean", 2, {"alpha": 1, "ridge": 0}), states, inputs=grams)
    got = merge_state_dicts(build_method("regmean", 2, {"alpha": 1, "ridge": 1e-9}), states, inputs=grams)
    avg = (states[0][k] + states[1][k]) / 2
    torch.testing.assert_close(got[k][:, 3:], avg[:, 3:], rtol=1e-4, atol=1e-5)
    assert n_in > 3 and not torch.allclose(got[k][:, :3], avg[:, :3], atol=1e-4)


@pytest.mark.parametrize("case, message", [
    ("alpha-zero", "option 'alpha'"),
    ("alpha-big", "option 'alpha'"),
    ("ridge-negative", "option 'ridge'"),
    ("users-zero", "option 'users'"),
    ("weights", "takes no per-model weights"),
    ("no-grams", "needs a function giving each model's linear-input Gram matrices"),
    ("base", "does not use a base checkpoint"),
    ("wrong-shape", "Gram matrix of 'blocks.0.ffn.fc2.weight' has shape"),
    ("not-linear", "not a linear layer's weight"),
    ("nan", "holds NaN or Inf"),
    ("different-layers", "model 2's Gram matrices are for"),
])
def test_bad_options_and_grams_are_refused_and_nothing_is_written(world, case, message):
    good = grams_of(world)
    kw = {"grams": good, "options": {}}
    if case == "alpha-zero":
        kw["options"] = {"alpha": 0}
    elif case == "alpha-big":
        kw["options"] = {"alpha": 1.5}
    elif case == "ridge-negative":
        kw["options"] = {"ridge": -1}
    elif case == "users-zero":
        kw["options"] = {"users": 0}
    elif case == "weights":
        kw["weights"] = [1.0, 1.0, 1.0]
    elif case == "no-grams":
        kw["grams"] = None
    elif case == "base":
        kw["base"] = world["ckpts"][0]
    elif case == "wrong-shape":
        kw["grams"] = lambda sd: good(sd) | {"blocks.0.ffn.fc2.weight": torch.eye(3)}
    elif case == "not-linear":
        kw["grams"] = lambda sd: good(sd) | {"out_bias": torch.eye(3)}
    elif case == "nan":
        kw["grams"] = lambda sd: {k: v * float("nan") for k, v in good(sd).items()}
    elif case == "different-layers":
        first = world["states"][0]["out_bias"]
        kw["grams"] = lambda sd: good(sd) if torch.equal(sd["out_bias"], first) else dict(list(good(sd).items())[1:])
    with pytest.raises(MergeOptionsError, match=message):
        merge_checkpoints("regmean", world["ckpts"], world["out"] / "m.safetensors", **kw)
    assert os.listdir(world["out"]) == []


def test_hook_grams_are_the_layer_inputs_recomputed_by_hand(tmp_path):
    from core.merge_inputs import gram_function, sample_users
    from models.backbone import SeqRecModel
    from models.batching import pad_left
    from models.config import BackboneConfig
    from tests.synthetic import make_planted_dataset

    ds = make_planted_dataset(tmp_path, n_users=25, n_items=20, seed=1)
    for kind in ("bert4rec", "sasrec"):
        cfg = BackboneConfig(n_items=ds.n_items, hidden=8, layers=2, heads=2, inner=12, max_len=9, kind=kind,
                             head=True)
        torch.manual_seed(0)
        model = SeqRecModel(cfg).eval()
        got = gram_function(ds, cfg, users=10, seed=3, batch_size=4)(model.state_dict())
        assert set(got) == {"blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.ffn.fc1.weight",
                            "blocks.0.ffn.fc2.weight", "blocks.1.attn.qkv.weight", "blocks.1.attn.proj.weight",
                            "blocks.1.ffn.fc1.weight", "blocks.1.ffn.fc2.weight", "head.weight"}
        users = sample_users(ds, 10, 3)
        assert len(users) == 10
        with torch.no_grad():
            # The first block's qkv reads the normalised embeddings of the real tokens (validation inputs).
            rows, finals = [], []
            for u in users:
                tokens = model.inference_tokens(pad_left([ds.split(u, "valid")[0][-cfg.max_len:]]))
                real = tokens[0] != 0
                pos = torch.arange(cfg.max_len - tokens.shape[1], cfg.max_len)
                x = model.emb_ln(model.item_emb(tokens) + model.pos_emb(pos)[None])
                rows.append(x[0][real])  # the post-LN block's qkv reads its input as it is
                finals.append(model.encode(tokens)[0, -1:])  # the head reads one state per sequence
            x, h = torch.cat(rows).double(), torch.cat(finals).double()
        torch.testing.assert_close(got["blocks.0.attn.qkv.weight"], x.T @ x, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["head.weight"], h.T @ h, rtol=1e-5, atol=1e-6)
