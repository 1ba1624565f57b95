"""Rank metrics on score matrices (SPEC §4): pessimistic ranks, NDCG@K, HR@K, MRR, error inconsistency.

Everything here works on plain tensors/arrays; which items are candidates is the caller's business
(models/evaluate.py builds the candidate masks for each protocol).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

METRIC_KS = (10, 20)


def rank_of_target(scores: torch.Tensor, target_col: torch.Tensor,
                   candidates: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each row's target among that row's candidates, ties counted pessimistically.

    scores (B, C); target_col (B,) the target's column; candidates (B, C) bool, None = every column.
    r = #other candidates with score >= the target's score. A target whose own column is not a
    candidate is a miss: r = inf. NaN scores count as -inf, so a NaN model can never look good.
    """
    s = scores.float()
    if torch.isnan(s).any():  # checked first: copying a (B, n_items) matrix per batch is not free
        s = torch.nan_to_num(s, nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
    col = target_col.long()[:, None]  # (B, 1)
    t = s.gather(1, col)  # (B, 1)
    at_least = s >= t  # (B, C); includes the target itself
    if candidates is None:
        return (at_least.sum(1) - 1).double()
    r = (at_least & candidates).sum(1) - 1
    present = candidates.gather(1, col).squeeze(1)
    return torch.where(present, r.double(), torch.full_like(r, torch.inf, dtype=torch.double))


def metric_names(ks: Sequence[int] = METRIC_KS) -> list[str]:
    names = []
    for k in ks:
        names += [f"ndcg@{k}", f"hr@{k}"]
    return names + ["mrr"]


def per_user_metrics(ranks, ks: Sequence[int] = METRIC_KS) -> dict[str, np.ndarray]:
    """ranks (U,) 0-based, inf = miss -> {metric: (U,) values}."""
    r = np.asarray(ranks, dtype=np.float64)
    out = {}
    with np.errstate(divide="ignore"):
        for k in ks:
            hit = r < k
            out[f"ndcg@{k}"] = np.where(hit, 1.0 / np.log2(np.where(hit, r, 0.0) + 2.0), 0.0)
            out[f"hr@{k}"] = hit.astype(np.float64)
        out["mrr"] = 1.0 / (r + 1.0)  # 1/inf = 0 for misses
    return out


def mean_metrics(ranks, ks: Sequence[int] = METRIC_KS) -> dict[str, float]:
    per_user = per_user_metrics(ranks, ks)
    if len(np.asarray(ranks)) == 0:
        raise ValueError("no ranks to average")
    return {name: float(per_user[name].mean()) for name in metric_names(ks)}


def mean_se(values) -> tuple[float, float]:
    """Mean of per-user values and its standard error over users; applied to the per-user differences of
    two models scored on the same users, the paired difference and its (much smaller) standard error."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v)))


def error_inconsistency(ndcg_a, ndcg_b, threshold: float = 0.5) -> float:
    """% of users where exactly one of two models scores NDCG@10 above `threshold`."""
    a, b = np.asarray(ndcg_a), np.asarray(ndcg_b)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"per-user NDCG arrays must be 1-D, non-empty and equally long; got {a.shape}, {b.shape}")
    return float(100.0 * np.mean((a > threshold) != (b > threshold)))
