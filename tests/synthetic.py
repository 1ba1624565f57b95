"""A small dataset with a planted rule, for tests that check a model really learns.

Every user walks the item ring: item i is followed by i+1 (n_items wraps to 1), from a random start.
A share `noise` of positions is replaced by a uniformly random item (the walk itself goes on), so
the rule is strong but not the only signal. Original ids equal internal ids (all items occur and
ids are numbered in ascending original-id order), so `planted_next` applies to internal ids too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.data import PreparedDataset, prepare_dataset


def planted_next(item: int, n_items: int) -> int:
    """The item the planted rule puts after `item` (1-based ids)."""
    return item % n_items + 1


def make_planted_dataset(tmp_path: Path, n_users: int = 200, n_items: int = 50, min_len: int = 8,
                         max_len: int = 30, seed: int = 0, noise: float = 0.05) -> PreparedDataset:
    if min_len < 3 or max_len < min_len:
        raise ValueError("need 3 <= min_len <= max_len (leave-one-out needs 3 items per user)")
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_len, max_len + 1, size=n_users)
    starts = rng.integers(0, n_items, size=n_users)
    # The first users' walks tile the ring so every item occurs and the id maps are the identity.
    tiles = min(n_users, -(-n_items // min_len))
    starts[:tiles] = np.arange(tiles) * min_len
    lines = []
    for u in range(n_users):
        walk = (starts[u] + np.arange(lengths[u])) % n_items + 1
        flip = rng.random(lengths[u]) < noise
        walk[flip] = rng.integers(1, n_items + 1, size=int(flip.sum()))
        lines.extend(f"{u + 1} {i}" for i in walk)
    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = tmp_path / "planted.txt"
    src.write_text("\n".join(lines) + "\n")
    ds = prepare_dataset(src, tmp_path / "planted", fmt="sasrec", min_user=min(5, min_len))
    if ds.n_items != n_items or ds.n_users != n_users:
        raise ValueError(f"planted dataset has {ds.n_items} items / {ds.n_users} users; "
                         f"need n_users * min_len >= n_items")
    return ds
