import numpy as np
import pytest
import torch

from models.backbone import SeqRecModel
from models.batching import length_batches, pad_left
from models.config import BackboneConfig
from models.objectives import causal_batch, cloze_batch


def model(kind, **kw):
    torch.manual_seed(0)
    return SeqRecModel(BackboneConfig(n_items=30, kind=kind, hidden=16, layers=2, heads=2, inner=32,
                                      max_len=12, **kw)).eval()


@pytest.mark.parametrize("kind", ["bert4rec", "sasrec"])
def test_extra_left_padding_changes_nothing(kind):
    # Length-aware batches are narrower than max_len; scores must not depend on the batch width.
    m = model(kind)
    hist = [[3, 4, 5, 6], [7, 8]]
    narrow = m.next_item_scores(pad_left(hist))
    wide = m.next_item_scores(pad_left(hist, width=11))
    torch.testing.assert_close(narrow, wide, rtol=1e-5, atol=1e-5)


def test_sasrec_is_causal_and_bert4rec_is_not():
    tokens = pad_left([[1, 2, 3, 4, 5]])
    changed = tokens.clone()
    changed[0, -1] = 9
    for kind, should_change in (("sasrec", False), ("bert4rec", True)):
        m = model(kind)
        a, b = m.encode(tokens)[0, :-1], m.encode(changed)[0, :-1]
        assert (not torch.allclose(a, b, atol=1e-6)) == should_change, kind


@pytest.mark.parametrize("kind", ["bert4rec", "sasrec"])
def test_long_history_is_truncated_to_the_most_recent_items(kind):
    m = model(kind)
    long = list(range(1, 26))
    keep = m.cfg.max_len - (0 if kind == "sasrec" else 1)
    torch.testing.assert_close(m.next_item_scores(pad_left([long])),
                               m.next_item_scores(pad_left([long[-keep:]])), rtol=1e-5, atol=1e-5)
    assert m.next_item_scores(pad_left([long])).shape == (1, 30)


def test_bert4rec_inference_appends_mask_token():
    m = model("bert4rec")
    toks = m.inference_tokens(pad_left([[1, 2, 3]]))
    assert toks[0, -1].item() == m.cfg.mask_token == 31
    assert toks[0, -4:-1].tolist() == [1, 2, 3]


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        BackboneConfig(n_items=5, hidden=10, heads=3)
    with pytest.raises(ValueError, match="unknown backbone"):
        BackboneConfig(n_items=5, kind="gru")


def test_pad_left_and_length_batches():
    t = pad_left([[1, 2, 3], [4]], width=4)
    assert t.tolist() == [[0, 1, 2, 3], [0, 0, 0, 4]]
    assert pad_left([[1, 2, 3, 4, 5]], width=2).tolist() == [[4, 5]]
    lengths = [5, 1, 9, 3, 7, 2]
    batches = length_batches(lengths, 2)
    assert [sorted(lengths[i] for i in b) for b in batches] == [[1, 2], [3, 5], [7, 9]]
    shuffled = length_batches(lengths, 2, np.random.default_rng(0))
    assert sorted(np.concatenate(shuffled).tolist()) == list(range(6))


def test_cloze_batch_masks_and_labels():
    rng = np.random.default_rng(0)
    samples = [np.arange(1, 11), np.array([4, 5]), np.array([7])]
    b = cloze_batch(samples, max_len=12, mask_token=99, mask_prob=0.3, last_share=0.0, rng=rng)
    rows, cols = b.positions.unbind(1)
    assert (b.tokens[rows, cols] == 99).all()
    assert set(rows.tolist()) == {0, 1, 2}  # every sample carries at least one masked position
    original = pad_left(samples, width=b.tokens.shape[1])
    assert torch.equal(b.labels, original[rows, cols] - 1)
    unmasked = b.tokens != 99
    assert torch.equal(b.tokens[unmasked], original[unmasked])  # padding and other items untouched
    only_last = cloze_batch(samples, 12, 99, 0.3, last_share=1.0, rng=rng)
    assert only_last.positions[:, 1].tolist() == [only_last.tokens.shape[1] - 1] * 3


def test_causal_batch_shifts_by_one():
    b = causal_batch([np.array([1, 2, 3, 4]), np.array([5, 6])], max_len=10)
    assert b.tokens.tolist() == [[1, 2, 3], [0, 0, 5]]
    assert b.labels.tolist() == [1, 2, 3, 5]  # items 2, 3, 4, 6 as 0-based columns


def test_the_sasrec_block_computes_the_same_with_and_without_a_hook_watching_its_qkv():
    # Unwatched, the block multiplies each slice of the qkv weight by the rows it serves; watched (the
    # per-example Fisher, RegMean), it sends both row sets through one module call. Same values and
    # gradients either way, and the watcher sees the one call.
    m = model("sasrec", norm="sasrec", dropout=0.0).train()
    tokens = pad_left([[1, 2, 3, 4, 5], [6, 7]])

    def run():
        m.zero_grad()
        out = m.encode(tokens)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]

    plain, plain_grads = run()
    seen = []
    handle = m.blocks[0].attn.qkv.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    try:
        watched, watched_grads = run()
    finally:
        handle.remove()
    assert seen == [torch.Size([2, 2 * tokens.shape[1], 16])]
    torch.testing.assert_close(watched, plain, rtol=1e-5, atol=1e-6)
    assert len(watched_grads) == len(plain_grads) > 10
    for a, b in zip(watched_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["bert4rec", "sasrec"])
@pytest.mark.parametrize("positions", ["end", "start"])
def test_a_batch_without_padding_attends_as_a_padded_one(kind, positions):
    # No padding: attention runs without a mask tensor (causal by the kernel's own flag for sasrec). Every
    # real position's state must equal what the masked path gives the same rows behind extra padding.
    m = model(kind, positions=positions)
    full = pad_left([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
    padded = pad_left([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]], width=9)
    torch.testing.assert_close(m.encode(full), m.encode(padded)[:, 3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.encode(full, last_only=True), m.encode(padded, last_only=True),
                               rtol=1e-5, atol=1e-5)
    # sasrec stays causal without the mask: a change at the end leaves earlier states alone
    changed = full.clone()
    changed[:, -1] = 20
    earlier_same = torch.allclose(m.encode(full)[:, :-1], m.encode(changed)[:, :-1], atol=1e-6)
    assert earlier_same == (kind == "sasrec")
