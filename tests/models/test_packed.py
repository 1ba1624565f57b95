"""The packed inference path (models/packed.py) against the padded one it replaces for serving."""

import numpy as np
import pytest
import torch

from models.backbone import SeqRecModel
from models.batching import pad_left
from models.config import BackboneConfig
from models.packed import attention_groups, final_states
from models.recommend import top_k

# The first design (post-LN with a head) and the one `recmerge train` ships (pre-LN, no head, ReLU).
DESIGNS = {"post": {}, "pre": {"norm": "pre", "head": False, "activation": "relu"},
           "pre-start": {"norm": "pre", "head": False, "activation": "relu", "positions": "start"},
           "sasrec": {"norm": "sasrec", "head": False, "activation": "relu"}}


def model(kind, layers=2, design="post"):
    torch.manual_seed(0)
    m = SeqRecModel(BackboneConfig(n_items=40, kind=kind, hidden=16, layers=layers, heads=2, inner=32,
                                   max_len=12, **DESIGNS[design])).eval()
    with torch.no_grad():  # LayerNorm weights away from 1 and biases away from 0, so a skipped LN would show
        for name, p in m.named_parameters():
            if "ln" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return m


def histories(seed=0):
    rng = np.random.default_rng(seed)
    # empty, length 1, exactly max_len - 1 and max_len, longer than max_len, and ties
    return [rng.integers(1, 41, size=n) for n in (0, 1, 11, 12, 30, 4, 4, 7, 2, 9)]


@pytest.mark.parametrize("design", list(DESIGNS))
@pytest.mark.parametrize("kind", ["bert4rec", "sasrec"])
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_packed_scores_equal_one_padded_row_at_a_time(kind, layers, design):
    m = model(kind, layers, design)
    hs = histories()
    with torch.no_grad():
        # One row per call: no padding at all, the reference each sequence must reproduce.
        want = torch.cat([m.next_item_scores(pad_left([h])) for h in hs])
        got = m.packed_scores([torch.from_numpy(h) for h in hs])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["bert4rec", "sasrec"])
def test_final_states_keep_input_order_and_ignore_groupmates(kind):
    m = model(kind)
    seqs = [m.inference_tokens(torch.from_numpy(h)[None])[0] for h in histories(1)]
    seqs = [s if len(s) else s.new_zeros(1) for s in seqs]
    with torch.no_grad():
        together = final_states(m, seqs)
        alone = torch.cat([final_states(m, [s]) for s in seqs])
        reversed_ = final_states(m, seqs[::-1]).flip(0)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reversed_, together, rtol=1e-5, atol=1e-5)
    # The states differ between sequences: an indexing slip that gave every row the same state would fail.
    assert not torch.allclose(together[2], together[3])


def test_final_states_refuse_lengths_outside_1_to_max_len():
    m = model("bert4rec")
    with pytest.raises(ValueError, match="lengths must be in 1..12"):
        final_states(m, [torch.ones(13, dtype=torch.long)])
    with pytest.raises(ValueError, match="lengths must be in 1..12"):
        final_states(m, [torch.ones(0, dtype=torch.long)])


def test_top_k_is_the_same_packed_or_padded():
    m = model("bert4rec")
    hs = histories(2)

    class Padded:  # the scorer interface without packed_scores: forces the padded path
        next_item_scores = staticmethod(m.next_item_scores)

    items, scores = top_k(m, hs, 8, 40, batch_size=4)
    items_p, scores_p = top_k(Padded(), hs, 8, 40, batch_size=4)
    np.testing.assert_array_equal(items, items_p)
    np.testing.assert_allclose(scores, scores_p, rtol=1e-5, atol=1e-5)


def brute_force_groups(lengths, overhead):
    """Every split of the sorted lengths into runs, the cheapest by the same cost."""
    n, best = len(lengths), (float("inf"), None)
    for mask in range(1 << (n - 1)):
        cuts = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
        runs = list(zip(cuts, cuts[1:]))
        cost = sum(overhead + (j - i) * lengths[j - 1] ** 2 for i, j in runs)
        best = min(best, (cost, runs))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_attention_groups_find_the_cheapest_split(seed):
    rng = np.random.default_rng(seed)
    lengths = sorted(rng.integers(1, 201, size=9).tolist())
    overhead = [0, 7_500, 10**9][seed % 3]
    runs = attention_groups(lengths, overhead)
    assert runs[0][0] == 0 and runs[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))  # contiguous, nothing dropped
    cost = sum(overhead + (j - i) * lengths[j - 1] ** 2 for i, j in runs)
    assert cost == pytest.approx(brute_force_groups(lengths, overhead)[0])
    if overhead == 10**9:
        assert runs == [(0, len(lengths))]  # calls so dear that one padded group wins
