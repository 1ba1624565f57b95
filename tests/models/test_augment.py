"""CL4SRec's augmentations keep their invariants on left-padded rows."""

import math

import numpy as np
import pytest

from models.recipes.augment import OPERATORS, crop, mask, reorder, two_views

MASK = 999


def padded(n: int, width: int, rng) -> np.ndarray:
    row = np.zeros(width, dtype=np.int64)
    if n:
        row[width - n :] = rng.choice(np.arange(1, 500), size=n, replace=False)  # distinct items
    return row


def check_crop(row, out, eta):
    n = np.count_nonzero(row)
    k = max(1, math.floor(eta * n + 1e-9)) if n else 0
    assert out.shape == row.shape
    assert np.count_nonzero(out) == k and not out[: len(row) - k].any()  # left-padded, length ⌊η·n⌋
    real, kept = row[len(row) - n :], out[len(row) - k :]
    assert any(np.array_equal(real[s : s + k], kept) for s in range(n - k + 1))  # one contiguous run


def check_mask(row, out, gamma):
    n = np.count_nonzero(row)
    p = len(row) - n
    assert np.array_equal(out[:p], row[:p])  # padding untouched
    changed = out != row
    assert changed.sum() == math.floor(gamma * n + 1e-9)
    assert (out[changed] == MASK).all() and not changed[:p].any()


def check_reorder(row, out, beta):
    n = np.count_nonzero(row)
    p = len(row) - n
    k = math.floor(beta * n + 1e-9)
    assert np.array_equal(out[:p], row[:p])
    assert sorted(out) == sorted(row)  # a permutation
    moved = np.flatnonzero(out != row)
    if len(moved):
        # Every moved item lies inside one window of k real positions, and those items were permuted.
        assert moved[0] >= p and moved[-1] - moved[0] < k
        assert sorted(out[moved]) == sorted(row[moved])


CHECKS = {"crop": check_crop, "mask": check_mask, "reorder": check_reorder}


@pytest.mark.parametrize("name", list(OPERATORS))
def test_each_operator_keeps_its_invariants(name):
    rng = np.random.default_rng(0)
    rate = {"crop": 0.6, "mask": 0.3, "reorder": 0.6}[name]
    for n in [0, 1, 2, 3, 5, 10, 17, 40]:
        for _ in range(5):
            row = padded(n, 40, rng)
            before = row.copy()
            out = OPERATORS[name](row, rate, rng, MASK)
            CHECKS[name](row, out, rate)
            assert np.array_equal(row, before)  # the input row is not modified in place


def test_counts_are_floor_of_rate_times_length_despite_float_error():
    rng = np.random.default_rng(1)
    row = padded(100, 120, rng)
    # 0.29 * 100 = 28.999999999999996 in floating point; ⌊γ·n⌋ means 29.
    assert (mask(row, 0.29, rng, MASK) == MASK).sum() == 29
    assert np.count_nonzero(crop(row, 0.29, rng, MASK)) == 29
    assert np.count_nonzero(crop(padded(5, 8, rng), 0.1, rng, MASK)) == 1  # never an empty view


def test_reorder_shuffles_a_window_not_the_whole_sequence():
    rng = np.random.default_rng(2)
    row = padded(50, 60, rng)
    outs = [reorder(row, 0.2, rng, MASK) for _ in range(50)]
    assert all(np.count_nonzero(o != row) <= 10 for o in outs)
    assert any(np.count_nonzero(o != row) > 0 for o in outs)  # it does move items
    assert np.array_equal(reorder(row, 0.0, rng, MASK), row)


def test_two_views_use_two_different_operators_and_each_keeps_its_invariants():
    rng = np.random.default_rng(3)
    rows = np.stack([padded(n, 30, rng) for n in rng.integers(0, 31, size=64)])
    rates = {"crop": 0.6, "mask": 0.3, "reorder": 0.6}
    v1, v2, ops = two_views(rows, rates, rng, MASK)
    assert v1.shape == v2.shape == rows.shape
    assert (ops[:, 0] != ops[:, 1]).all()
    names = list(OPERATORS)
    for i, row in enumerate(rows):
        for view, op in ((v1[i], ops[i, 0]), (v2[i], ops[i, 1])):
            CHECKS[names[op]](row, view, rates[names[op]])
    # Every ordered pair of distinct operators shows up: the choice is random, not fixed.
    assert len({(int(a), int(b)) for a, b in ops}) == 6
