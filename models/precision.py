"""Mixed precision for training: the products in bfloat16 where the hardware makes them cheap.

On a CPU with AMX tiles (Intel Sapphire Rapids and later) a bfloat16 product runs 4-9x faster than a
float32 one on one core (6,400 x 64 by 64 x 513: 1.9 ms against 9.0 ms; a 128 -> 384 Linear over a
32 x 200 batch: 1.1 ms against 9.0 ms; torch 2.13, docs/results/train_speed.md). Only the products
change type: parameters, optimiser state, the residual stream, every LayerNorm, the softmax of the
output layer and all sums stay float32 (models/backbone.py, models/item_ce.py). Evaluation, serving
and Fisher estimation always run in float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def fast_bf16(device: torch.device) -> bool:
    """Whether bfloat16 products are measured to pay on this device: AMX on CPU, bf16 support on CUDA.
    AVX512-BF16 without AMX (an AMD EPYC, Zen 4, 2026-12-07): the products alone ran 2.4-2.9x faster on
    one core, but a whole training step only 1.07x (bert4rec) and 1.11x (sasrec) on two, so it keeps
    float32 (docs/results/accuracy-ml-1m.md)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private; absent in some builds
        return bool(probe and probe())
    return False


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """'fp32' -> None (no autocast), 'bf16' -> torch.bfloat16, 'auto' -> bfloat16 where fast_bf16."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (got {name!r})")
    if name == "bf16" or (name == "auto" and fast_bf16(device)):
        return torch.bfloat16
    return None


@contextmanager
def mixed_precision(model: torch.nn.Module, dtype: torch.dtype | None) -> Iterator[None]:
    """The model's products in `dtype` inside the block (None: float32), restored afterwards."""
    previous = model.compute_dtype
    model.compute_dtype = dtype
    try:
        yield
    finally:
        model.compute_dtype = previous
