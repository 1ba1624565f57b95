"""The contrastive pieces against direct computations: InfoNCE, SimThres, EHRec's negatives, the gate."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.backbone import SeqRecModel
from models.batching import pad_left
from models.config import BackboneConfig
from models.objectives import causal_batch
from models.recipes import TrainBatch, recipe_class, recipe_options
from models.recipes.contrastive import (
    SimilarityHistogram,
    SimThres,
    candidate_negatives,
    encode_views,
    info_nce,
    negative_similarities,
    pair_index,
    same_target_logw,
    similarity,
    view_rows,
)


def loop_info_nce(sim, tau, keep=None):
    """InfoNCE written out view by view; keep(i, j) says whether candidate j counts as a negative of i."""
    n2 = len(sim)
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        p = (i + n) % n2
        negatives = [j for j in range(n2) if j not in (i, p)]
        assert len(negatives) == n2 - 2
        if keep is not None:
            negatives = [j for j in negatives if keep(i, j)]
        num = math.exp(sim[i][p] / tau)
        den = num + sum(math.exp(sim[i][j] / tau) for j in negatives)
        total += -math.log(num / den)
    return total / n2


@pytest.mark.parametrize("kind", ["dot", "cos"])
def test_info_nce_equals_a_direct_loop_with_2n_minus_2_negatives(kind):
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    z = torch.cat([z1, z2]).double()
    sim = similarity(z, kind)
    if kind == "cos":
        assert torch.allclose(sim, F.cosine_similarity(z[:, None], z[None], dim=-1))
    else:
        assert torch.allclose(sim, z @ z.T)
    for tau in (1.0, 0.3):
        got = info_nce(sim, tau).item()
        assert got == pytest.approx(loop_info_nce(sim.tolist(), tau), rel=1e-9)


def test_pairs_and_candidate_negatives():
    assert pair_index(6).tolist() == [3, 4, 5, 0, 1, 2]
    neg = candidate_negatives(6)
    assert neg.sum(1).tolist() == [4] * 6  # 2N - 2
    assert not neg.diagonal().any() and not neg[torch.arange(6), pair_index(6)].any()


def test_false_negative_masking_drops_same_target_views():
    torch.manual_seed(1)
    sim = torch.randn(8, 8, dtype=torch.float64)
    sim = (sim + sim.T) / 2
    targets = torch.tensor([7, 3, 7, 5, 7, 3, 7, 5])  # [t; t] for N = 4
    got = info_nce(sim, 0.5, same_target_logw(targets)).item()
    want = loop_info_nce(sim.tolist(), 0.5, keep=lambda i, j: targets[i] != targets[j])
    assert got == pytest.approx(want, rel=1e-9)
    assert got < info_nce(sim, 0.5).item()  # fewer negatives, smaller loss


def test_negative_similarities_are_each_candidate_pair_once():
    sim = torch.arange(36, dtype=torch.float64).view(6, 6)
    want = sorted(sim[i, j].item() for i in range(6) for j in range(i + 1, 6) if j != (i + 3) % 6)
    assert sorted(negative_similarities(sim).tolist()) == want
    assert len(want) == 6 * 4 // 2


def test_simthres_is_the_quantile_of_what_it_saw_and_lags_one_epoch():
    rng = np.random.default_rng(0)
    thres = SimThres(0.9)
    epoch1 = [rng.normal(size=n) for n in (50, 70, 31)]
    used = [thres.observe(torch.tensor(v)) for v in epoch1]
    # First epoch: each batch is thresholded at its own q-quantile.
    assert used == pytest.approx([np.quantile(v, 0.9) for v in epoch1])
    log = thres.end_epoch()
    k1 = np.mean([np.quantile(v, 0.9) for v in epoch1])
    assert log["k_stat"] == pytest.approx(k1) and log["k_threshold"] == pytest.approx(np.mean(used))
    # Second epoch: every batch uses the first epoch's average, whatever the batch holds.
    epoch2 = [rng.normal(loc=5.0, size=40) for _ in range(3)]
    assert [thres.observe(torch.tensor(v)) for v in epoch2] == pytest.approx([k1] * 3)
    log = thres.end_epoch()
    assert log["k_threshold"] == pytest.approx(k1)
    assert log["k_stat"] == pytest.approx(np.mean([np.quantile(v, 0.9) for v in epoch2]))
    assert thres.observe(torch.tensor([0.0, 1.0])) == pytest.approx(log["k_stat"])


def test_similarity_histogram_has_fixed_bins_and_counts_everything():
    hist = SimilarityHistogram(4, -1.0, 1.0)
    hist.add(torch.tensor([-0.9, -0.1, 0.1, 0.2, 0.99, 1.5, -3.0]))  # out-of-range values land in the edge bins
    out = hist.pop()
    assert out["edges"] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert out["counts"] == [2, 1, 2, 2]
    assert hist.pop()["counts"] == [0, 0, 0, 0]  # reset per epoch


def tiny_model(kind="bert4rec", seed=0):
    torch.manual_seed(seed)
    return SeqRecModel(BackboneConfig(n_items=30, kind=kind, hidden=16, layers=2, heads=2, inner=32, max_len=12))


def make_recipe(name, model, **options):
    recipe = recipe_class(name)(recipe_options(name, options), model)
    return recipe


def test_ehrec_stat_negatives_are_exactly_the_pairs_below_threshold():
    torch.manual_seed(2)
    recipe = make_recipe("ehrec-stat", tiny_model())
    z = torch.randn(10, 16, dtype=torch.float64)
    sim = similarity(z, "dot")
    k = float(torch.quantile(negative_similarities(sim), 0.9))
    logw, reg = recipe.negatives(sim, z, k)
    assert reg is None
    neg = candidate_negatives(10)
    kept = {(i, j) for i in range(10) for j in range(10) if neg[i, j] and logw[i, j] == 0}
    want = {(i, j) for i in range(10) for j in range(10) if neg[i, j] and sim[i, j] < k}
    assert kept == want and 0 < len(kept) < neg.sum()
    assert (logw[neg][sim[neg] >= k] == -math.inf).all()
    got = info_nce(sim, 1.0, logw).item()
    assert got == pytest.approx(loop_info_nce(sim.tolist(), 1.0, keep=lambda i, j: sim[i, j] < k), rel=1e-9)


def test_ehrec_learn_gate_passes_gradient_to_g_from_the_loss_and_from_l_reg():
    torch.manual_seed(3)
    recipe = make_recipe("ehrec-learn", tiny_model(), g_hidden=8, gate_temperature=0.5)
    g_params = recipe.parameters()
    assert g_params and all(p.requires_grad for p in g_params)
    z = torch.randn(12, 16)
    sim = similarity(z, "dot")
    k = float(torch.quantile(negative_similarities(sim), 0.9))

    logw, reg = recipe.negatives(sim, z, k)
    info_nce(sim, 1.0, logw).backward()
    grads = [p.grad.abs().sum().item() for p in g_params]
    assert all(gr > 0 for gr in grads), grads  # the contrastive loss alone trains g

    for p in g_params:
        p.grad = None
    _, reg = recipe.negatives(sim, z, k)
    reg.backward()
    assert all(p.grad.abs().sum().item() > 0 for p in g_params)  # so does L_reg

    # The gate is a soft version of "below the threshold": far below -> kept, far above -> dropped.
    k_learn = recipe.g(z, k).detach()
    w = logw.exp().detach()
    far_below = (sim < k_learn[:, None] - 5) & candidate_negatives(12)
    far_above = (sim > k_learn[:, None] + 5) & candidate_negatives(12)
    assert far_below.any() and far_above.any()
    assert (w[far_below] > 0.99).all() and (w[far_above] < 0.01).all()


@pytest.mark.parametrize("kind", ["bert4rec", "sasrec"])
def test_views_are_the_final_state_of_the_input_and_chunked_last_only_encoding_is_exact(kind):
    model = tiny_model(kind).eval()
    rng = np.random.default_rng(0)
    samples = [rng.integers(1, 31, size=n) for n in (2, 5, 9, 12)]
    others = [rng.integers(1, 31, size=n) for n in (3, 7)]  # another set, another width
    rows, other_rows = view_rows(samples), view_rows(others)
    tokens = model.inference_tokens(torch.as_tensor(rows))
    full = model.encode(tokens)[:, -1]
    one_by_one = torch.cat([model.encode(model.inference_tokens(torch.as_tensor(view_rows([s]))))[:, -1]
                            for s in others])
    for chunks in (1, 3, 8):
        z, z_other = encode_views(model, rows, other_rows, chunks=chunks)
        assert torch.allclose(z, full, atol=1e-5) and torch.allclose(z_other, one_by_one, atol=1e-5)
    if kind == "sasrec":
        # The next-item batch's input is exactly each sample's view: its final state can be reused.
        h = model.encode(causal_batch(samples, 12).tokens)
        assert torch.allclose(h[:, -1], full, atol=1e-5)
    else:
        assert (tokens[:, -1] == model.cfg.mask_token).all()
        assert torch.equal(tokens[:, :-1], pad_left([s[:-1] for s in samples], width=11))


def test_contrastive_loss_reaches_the_backbone_and_g_through_a_training_step():
    model = tiny_model("bert4rec")
    recipe = make_recipe("ehrec-learn", model, g_hidden=8)
    rng = np.random.default_rng(0)
    samples = [rng.integers(1, 31, size=n) for n in rng.integers(2, 12, size=16)]
    recipe.setup(samples)
    loss, logs = recipe.loss(model, TrainBatch(samples[:8], np.arange(8), rng))
    loss.backward()
    assert {"backbone_loss", "cl_loss", "negatives_kept", "reg_loss"} <= set(logs)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in recipe.parameters())
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    stats = recipe.end_epoch()
    assert stats["k_stat"] is not None and stats["k_learn_std"] >= 0
    assert sum(stats["similarity_histogram"]["counts"]) == 2 * (16 * 14 // 2)  # two InfoNCE terms, 2N = 16


def test_false_negative_masking_inside_a_recipe_only_removes_negatives():
    model = tiny_model("sasrec").eval()  # no dropout: both calls see the very same views
    rng = np.random.default_rng(0)
    samples = [np.append(rng.integers(1, 31, size=5), t) for t in (3, 3, 3, 7, 7, 9, 11, 3)]
    losses = {}
    for mask in (False, True):
        recipe = make_recipe("duorec-sup", model, mask_false_negatives=mask)
        recipe.setup(samples)
        _, logs = recipe.loss(model, TrainBatch(samples, np.arange(8), np.random.default_rng(1)))
        losses[mask] = logs["cl_loss"]
    # Same views, same positives; masking drops the same-target views (here most of the batch) from the
    # denominators, so the loss can only go down, and with this many repeats it does.
    assert losses[True] < losses[False] - 0.1
