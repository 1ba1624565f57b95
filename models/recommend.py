"""Top-k next items for a history: the one scoring path shared by the CLI and the API.

Items the history already holds are excluded by default (a recommender that re-suggests what the
user has seen is useless for MovieLens-style data); the model still reads the whole history.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from models.batching import length_batches
from models.errors import DataError, RecmergeError
from models.evaluate import as_scorer, history_mask, model_mode, padded_batches


def check_k(k: int, n_items: int) -> int:
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= n_items:
        raise RecmergeError(f"k must be an integer in 1..{n_items} (the number of items), got {k}")
    return int(k)


def top_k(model, histories: Sequence[Sequence[int]], k: int, n_items: int, exclude_history: bool = True,
          batch_size: int = 256, device=None) -> tuple[np.ndarray, np.ndarray]:
    """(U, k) item ids and scores, best first. When exclusion leaves fewer than k items, the tail of
    a row is item 0 with score -inf."""
    k = check_k(k, n_items)
    histories = [np.asarray(h, dtype=np.int64).reshape(-1) for h in histories]
    for h in histories:
        if len(h) and (h.min() < 1 or h.max() > n_items):
            bad = h[(h < 1) | (h > n_items)][0]
            raise DataError(f"history item {int(bad)} is not an item id in 1..{n_items}")
    score, cap, dev = as_scorer(model, device)
    items = np.zeros((len(histories), k), dtype=np.int64)
    scores = np.full((len(histories), k), -np.inf, dtype=np.float32)
    packed = getattr(model, "packed_scores", None)
    with torch.no_grad(), model_mode(model):
        for idx, tokens in _batches(histories, batch_size, cap, packed is not None):
            s = (packed(tokens) if packed is not None else score(tokens.to(dev))).float()  # (B, n_items)
            s = torch.nan_to_num(s, nan=-torch.inf)
            if exclude_history:
                s = s.masked_fill(history_mask([histories[i] for i in idx], n_items, dev), -torch.inf)
            val, col = torch.topk(s, k, dim=1)  # (B, k)
            ids = torch.where(torch.isinf(val) & (val < 0), torch.zeros_like(col), col + 1)
            items[idx] = ids.cpu().numpy()
            scores[idx] = val.cpu().numpy()
    return items, scores


def _batches(histories, batch_size: int, cap: int | None, packed: bool):
    """(row indices, a padded (B, T) batch, or the B histories themselves for a packed scorer)."""
    if not packed:
        yield from padded_batches(histories, batch_size, cap)
        return
    for idx in length_batches([len(h) for h in histories], batch_size):
        yield idx, [torch.from_numpy(np.require(histories[i], requirements="W")) for i in idx]


def recommend_history(model, history: Sequence[int], k: int, n_items: int, exclude_history: bool = True,
                      device=None) -> list[tuple[int, float]]:
    """[(internal item id, score)] for one history, best first, at most k long."""
    items, scores = top_k(model, [history], k, n_items, exclude_history, device=device)
    return [(int(i), float(s)) for i, s in zip(items[0], scores[0]) if i > 0]


def recommend_for_user(model, ds, user, k: int = 10, device=None) -> list[dict]:
    """Top-k for a known user of the dataset, whose whole known sequence is the history.

    Returns [{"item": original item id, "title": str | None, "score": float}], best first.
    """
    u = ds.user_index(user)  # DataError if unknown
    recs = recommend_history(model, ds.sequence(u), k, ds.n_items, device=device)
    titles = ds.titles or {}
    out = []
    for item, s in recs:
        original = ds.item_ids[item - 1]
        out.append({"item": original, "title": titles.get(original, titles.get(str(original))), "score": s})
    return out
