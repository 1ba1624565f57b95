"""Turning variable-length sequences into left-padded batches without paying for padding."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def pad_left(seqs: Sequence[Sequence[int]], width: int | None = None) -> torch.Tensor:
    """Left-pad (and left-truncate) to `width`: the most recent item sits in the last column."""
    if width is None:
        width = max((len(s) for s in seqs), default=1) or 1
    out = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        s = np.asarray(s[-width:], dtype=np.int64)
        if len(s):
            out[i, width - len(s) :] = s
    return torch.from_numpy(out)


def length_batches(lengths: Sequence[int], batch_size: int, rng: np.random.Generator | None = None,
                   ) -> list[np.ndarray]:
    """Group indices of similar length so a batch is only as wide as its longest member.

    With an rng the order inside length-ties and the order of batches are shuffled (training);
    without, batches come in length order (evaluation).
    """
    lengths = np.asarray(lengths)
    if rng is None:
        order = np.argsort(lengths, kind="stable")
    else:
        # Jitter before sorting so equal-length sequences land in different batches each epoch.
        order = np.lexsort((rng.random(len(lengths)), lengths))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(batches)
    return batches
