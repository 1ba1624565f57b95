"""CL4SRec's sequence augmentations: crop, mask, reorder.

Each operator takes one left-padded row (0 = padding, real items at the end) and returns a new row of
the same width; only the n real items are touched, so padding stays padding (a crop only adds more).
Counts are ⌊rate·n⌋; a crop keeps at least one item so that a view is never empty.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Operator = Callable[[np.ndarray, float, np.random.Generator, int], np.ndarray]


def _count(rate: float, n: int) -> int:
    # The epsilon keeps ⌊0.29·100⌋ at 29 despite 0.29·100 = 28.999999999999996 in floating point.
    return min(n, math.floor(rate * n + 1e-9))


def _split(row: np.ndarray) -> tuple[int, int]:
    """(number of padding columns, number of real items) of a left-padded row."""
    n = int(np.count_nonzero(row))
    return len(row) - n, n


def crop(row: np.ndarray, eta: float, rng: np.random.Generator, mask_token: int) -> np.ndarray:
    """Keep a random contiguous run of max(1, ⌊η·n⌋) items, left-padded back to the row's width."""
    p, n = _split(row)
    out = np.zeros_like(row)
    if n == 0:
        return out
    k = max(1, _count(eta, n))
    start = p + int(rng.integers(0, n - k + 1))
    out[len(row) - k :] = row[start : start + k]
    return out


def mask(row: np.ndarray, gamma: float, rng: np.random.Generator, mask_token: int) -> np.ndarray:
    """Replace ⌊γ·n⌋ distinct random items by [MASK]."""
    p, n = _split(row)
    out = row.copy()
    k = _count(gamma, n)
    if k:
        out[p + rng.choice(n, size=k, replace=False)] = mask_token
    return out


def reorder(row: np.ndarray, beta: float, rng: np.random.Generator, mask_token: int) -> np.ndarray:
    """Shuffle one random contiguous window of ⌊β·n⌋ items; everything outside it stays in place."""
    p, n = _split(row)
    out = row.copy()
    k = _count(beta, n)
    if k > 1:
        start = p + int(rng.integers(0, n - k + 1))
        out[start : start + k] = rng.permutation(row[start : start + k])
    return out


OPERATORS: dict[str, Operator] = {"crop": crop, "mask": mask, "reorder": reorder}


def two_views(rows: np.ndarray, rates: dict[str, float], rng: np.random.Generator, mask_token: int,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two augmented copies of each left-padded row (B, T), each made by a different random operator.

    rates: operator name -> its rate (crop: η, mask: γ, reorder: β). Returns (view1, view2, ops) where
    ops (B, 2) holds the index into OPERATORS of the operator behind each view.
    """
    names = list(OPERATORS)
    # argsort of uniform noise = a random permutation per row; its first two entries are distinct.
    ops = np.argsort(rng.random((len(rows), len(names))), axis=1)[:, :2]
    views = [np.empty_like(rows), np.empty_like(rows)]
    for i, row in enumerate(rows):
        for v in range(2):
            name = names[ops[i, v]]
            views[v][i] = OPERATORS[name](row, rates[name], rng, mask_token)
    return views[0], views[1], ops
