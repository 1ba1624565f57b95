"""The fast CPU dropout: nn.Dropout's contract (rate, scale, gradient, eval identity), masks set by torch's
seed."""

import pytest
import torch

from models.dropout import Dropout


def test_drops_at_the_rate_scales_the_rest_and_passes_the_gradient_through_the_same_mask():
    torch.manual_seed(0)
    d = Dropout(0.2).train()
    x = torch.rand(400, 500) + 0.5  # no zeros of its own
    x.requires_grad_()
    y = d(x)
    dropped = y == 0
    # 200,000 draws: the share dropped is within 5 standard errors (0.0045) of the rate
    assert abs(dropped.float().mean().item() - 0.2) < 0.0045
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.8, rtol=1e-4, atol=0)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g == 0, dropped)
    torch.testing.assert_close(g[~dropped], torch.full_like(g[~dropped], 1 / 0.8), rtol=1e-4, atol=0)


def test_the_mask_follows_torch_seed_and_differs_between_calls():
    d = Dropout(0.5).train()
    x = torch.ones(64, 64)
    torch.manual_seed(3)
    a, b = d(x), d(x)
    torch.manual_seed(3)
    assert torch.equal(d(x), a)
    assert not torch.equal(a, b)


def test_eval_mode_and_zero_rate_are_the_identity_and_bad_rates_are_refused():
    x = torch.randn(10, 10)
    assert d_is_identity(Dropout(0.3).eval(), x)
    assert d_is_identity(Dropout(0.0).train(), x)
    for p in (-0.1, 1.0):
        with pytest.raises(ValueError, match="dropout"):
            Dropout(p)


def d_is_identity(d, x):
    return torch.equal(d(x), x)


def test_a_bfloat16_input_stays_bfloat16_and_keeps_its_values_times_the_scale_rounded_once():
    torch.manual_seed(1)
    d = Dropout(0.2).train()
    x = (torch.rand(300, 200) + 0.5).to(torch.bfloat16).requires_grad_()
    y = d(x)
    assert y.dtype == torch.bfloat16
    kept = y != 0
    assert 0.78 < kept.float().mean().item() < 0.82
    assert torch.equal(y[kept], (x.detach().float()[kept] * d.scale).to(torch.bfloat16))
    (g,) = torch.autograd.grad(y.float().sum(), x)
    assert g.dtype == torch.bfloat16 and torch.equal(g != 0, kept)


def test_the_mask_is_the_one_numpys_byte_stream_gives_for_the_seed_torch_draws():
    # The raw words read as 16-bit draws are Generator.bytes' bits: a seeded run's masks did not change
    # when the byte-string copy was dropped.
    import numpy as np

    from models.dropout import keep_scale

    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**62, ()))
    bits = np.frombuffer(np.random.Generator(np.random.PCG64(seed)).bytes(2 * 1001), dtype=np.uint16)
    torch.manual_seed(5)
    keep = keep_scale(torch.Size([7, 143]), 13107, 1.25)
    assert torch.equal(keep.reshape(-1) == 0, torch.from_numpy(bits < 13107))
