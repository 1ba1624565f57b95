"""The chunked full-softmax loss and the sampled one, against plain cross-entropy on full logits."""

import math

import pytest
import torch
import torch.nn.functional as F

from models.backbone import SeqRecModel
from models.config import BackboneConfig
from models.item_ce import item_cross_entropy, sampled_cross_entropy
from models.objectives import sampled_ce


def _inputs(M=300, N=70, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(M, D, generator=g, dtype=torch.float64, requires_grad=True)
    table = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(N, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, N, (M,), generator=g)
    return z, table, bias, labels


@pytest.mark.parametrize("chunk", [1, 7, 64, 300, 1000])
def test_chunked_loss_and_gradients_equal_full_logits(chunk):
    z, table, bias, labels = _inputs()
    got = item_cross_entropy(z, table, bias, labels, chunk=chunk)
    g_got = torch.autograd.grad(2.5 * got, (z, table, bias))
    want = F.cross_entropy(z @ table.T + bias, labels)
    g_want = torch.autograd.grad(2.5 * want, (z, table, bias))
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_chunked_loss_without_grad_and_with_frozen_inputs():
    z, table, bias, labels = _inputs()
    want = F.cross_entropy(z @ table.T + bias, labels)
    with torch.no_grad():
        torch.testing.assert_close(item_cross_entropy(z, table, bias, labels, chunk=16), want)
    frozen = item_cross_entropy(z, table.detach(), bias.detach(), labels, chunk=16)
    (gz,) = torch.autograd.grad(frozen, (z,))
    torch.testing.assert_close(gz, torch.autograd.grad(want, (z,))[0])
    with pytest.raises(ValueError, match="at least one row"):
        item_cross_entropy(z[:0], table, bias, labels[:0])


def test_sampled_loss_drops_accidental_hits_and_corrects_for_sampling():
    torch.manual_seed(0)
    m = SeqRecModel(BackboneConfig(n_items=30, kind="sasrec", hidden=8, layers=1, heads=1, inner=8, max_len=5,
                                   norm="pre", head=False, activation="relu"))
    z = torch.randn(6, 8, requires_grad=True)
    labels = torch.tensor([0, 3, 3, 29, 10, 11])
    # The same draws by hand, with a seed under which label 3 is among the negatives: it must not count
    # against rows whose target is 3.
    seed = next(s for s in range(100) if 3 in torch.randperm(30, generator=torch.Generator().manual_seed(s))[:5])
    torch.manual_seed(seed)
    got = sampled_ce(m, z, labels, k=5)
    neg = torch.randperm(30, generator=torch.Generator().manual_seed(seed))[:5]
    assert len(set(neg.tolist())) == 5  # distinct: each item's inclusion probability is k/N
    table = m.item_emb.weight[1:31]
    pos = (z * table[labels]).sum(1) + m.out_bias[labels]
    negs = z @ table[neg].T + m.out_bias[neg] + math.log(30 / 5)
    negs = negs.masked_fill(labels[:, None] == neg[None, :], -math.inf)
    want = F.cross_entropy(torch.cat([pos[:, None], negs], 1), torch.zeros(6, dtype=torch.long))
    torch.testing.assert_close(got, want)
    params = (z, m.item_emb.weight, m.out_bias)
    for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, b)
    assert math.isfinite(got.item())


@pytest.mark.parametrize("chunk", [1, 5, 300])
def test_chunked_sampled_loss_equals_concatenated_logits(chunk):
    z, table, bias, labels = _inputs(M=50, N=9)
    own = torch.randn(50, dtype=torch.float64, requires_grad=True)
    exclude = torch.randint(-1, 9, (50,))  # -1: nothing to leave out
    got = sampled_cross_entropy(z, own, table, bias, exclude, chunk=chunk)
    logits = (z @ table.T + bias).masked_fill(
        torch.nn.functional.one_hot(exclude.clamp(min=0), 9).bool() & (exclude >= 0)[:, None], -math.inf)
    want = F.cross_entropy(torch.cat([own[:, None], logits], 1), torch.zeros(50, dtype=torch.long))
    torch.testing.assert_close(got, want)
    params = (z, table, bias, own)
    for a, b in zip(torch.autograd.grad(3 * got, params), torch.autograd.grad(3 * want, params)):
        torch.testing.assert_close(a, b)
