"""Dropout whose random mask costs a fraction of torch's on CPU.

torch's CPU dropout draws one Bernoulli sample per element through its Mersenne-Twister generator: on
ml-1m it was the single largest item of a training step (16-18% of a 2-thread step, 3.4 ms for a
(4,800 x 64) tensor; torch.profiler, docs/results/train_speed.md). Here the mask comes from 16 random
bits per element drawn by numpy's PCG64, seeded from torch's own generator on every call, so
`torch.manual_seed` and a saved torch RNG state still determine every mask (a resumed run repeats an
uninterrupted one bit for bit). The drop probability is rounded to a multiple of 2^-16 and the kept
values scaled by the exact inverse of the rounded keep probability, so the expectation is unchanged.
On CUDA, torch's own kernel is used.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

_LEVELS = 1 << 16


class _MaskedScale(torch.autograd.Function):
    """y = x * scale where kept, 0 where dropped; the boolean mask (1 byte per element) is all that is
    saved for the backward."""

    @staticmethod
    def forward(ctx, x, drop, scale):
        ctx.save_for_backward(drop)
        ctx.scale = scale
        return x.masked_fill(drop, 0.0).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (drop,) = ctx.saved_tensors
        return grad.masked_fill(drop, 0.0).mul_(ctx.scale), None, None


def drop_mask(shape: torch.Size, threshold: int) -> torch.Tensor:
    """A boolean tensor, True with probability threshold / 2^16, from a PCG64 stream seeded by torch."""
    seed = int(torch.randint(0, 2**62, ()))  # advances torch's generator: the mask follows its state
    n = int(np.prod(shape))
    bits = np.frombuffer(np.random.Generator(np.random.PCG64(seed)).bytes(2 * n), dtype=np.uint16)
    return torch.from_numpy(bits < threshold).reshape(shape)


class Dropout(nn.Module):
    """Drop-in for nn.Dropout (no parameters, identity in eval mode)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1) (got {p})")
        self.p = p
        self.threshold = round(p * _LEVELS)
        self.scale = _LEVELS / (_LEVELS - self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        return _MaskedScale.apply(x, drop_mask(x.shape, self.threshold), self.scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"
