"""Which items enter a sequence's Fisher term, and with what weight (SPEC §5, thesis eqs. 3.9-3.13).

F_i = Σ_j w_ij (∇ log p(v_ij | s_i))², per sampling:
    exact   every item, in id order                    w = p(v|s)
    random  n items, uniform without replacement       w = p(v|s)
    topk    the n most probable items                  w = p(v|s)
    model   n draws from p(.|s), WITH replacement      w = 1/n   (Monte Carlo: the plain mean, eq. 3.12)
    target  the true next item                         w = 1     (the empirical Fisher, eq. 3.13)
`model` draws with replacement because that is what makes (1/n) Σ_j (∇ log p(v_j))² an unbiased
estimate of E_{v~p}[(∇ log p(v))²] = the exact term; a repeated draw simply counts twice.

Random draws depend only on (seed, key) — key = the user's index — never on batch composition or
order, so a Fisher is reproducible whatever the batch size and a subsample keeps its users' draws.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

SAMPLINGS = ("exact", "random", "topk", "model", "target")
NEEDS_N = ("random", "topk", "model")


def n_selected(sampling: str, n: int | None, n_items: int) -> int:
    if sampling == "exact":
        return n_items
    if sampling == "target":
        return 1
    return int(n)


def select_items(probs: torch.Tensor, sampling: str, n: int | None = None, targets: torch.Tensor | None = None,
                 keys: Sequence[int] | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """probs (B, n_items) next-item distributions (column c = item c+1) -> (columns (B, K) long, weights (B, K)).

    targets (B,) internal item ids (1..n_items), needed for `target`; keys (B,) seed each row's draws.
    """
    B, n_items = probs.shape
    device = probs.device
    if sampling == "exact":
        cols = torch.arange(n_items, device=device).expand(B, n_items)
        return cols, probs
    if sampling == "target":
        if targets is None:
            raise ValueError("sampling 'target' needs the target items")
        cols = (targets.to(device).long() - 1)[:, None]
        return cols, torch.ones(B, 1, dtype=probs.dtype, device=device)
    if sampling not in NEEDS_N:
        raise ValueError(f"unknown sampling {sampling!r}; known: {', '.join(SAMPLINGS)}")
    if n is None or not 1 <= n <= n_items:
        raise ValueError(f"sampling {sampling!r} needs 1 <= n <= {n_items} (got {n})")
    if sampling == "topk":
        cols = probs.topk(n, dim=1).indices
        return cols, probs.gather(1, cols)
    keys = range(B) if keys is None else keys
    rngs = [np.random.default_rng([seed, int(k)]) for k in keys]
    if sampling == "random":
        cols = torch.from_numpy(np.stack([r.choice(n_items, size=n, replace=False) for r in rngs])).to(device)
        return cols, probs.gather(1, cols)
    # model: inverse-CDF draws, in float64 so the cumulative sum does not drift below the last item.
    u = torch.from_numpy(np.stack([r.random(n) for r in rngs])).to(device)
    cdf = probs.double().cumsum(dim=1)
    cdf = cdf / cdf[:, -1:]
    cols = torch.searchsorted(cdf, u, right=True).clamp_max(n_items - 1)
    return cols, torch.full((B, n), 1.0 / n, dtype=probs.dtype, device=device)
