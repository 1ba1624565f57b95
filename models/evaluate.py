"""Evaluation protocols (SPEC §4): full ranking, sampled negatives and the top-popular candidate set.

The core works on plain arrays (`EvalData`: inputs, targets, touched items, popularity); `evaluate(model,
ds, ...)` only pulls those arrays out of a PreparedDataset. One forward pass per batch feeds every
protocol. Ranks are 0-based and pessimistic about ties (models/metrics.py).

Protocols, for a user with model input h, target t and whole known sequence S:
- full:           candidates = all items except those in h; t is always a candidate, even if t ∈ h.
- random100:      t + 100 negatives drawn uniformly, without replacement, from items ∉ S.
- popular100:     t + 100 negatives drawn ∝ training popularity, without replacement, from items ∉ S
                  (items never seen in training have weight 0 and are never drawn).
- top-popular100: candidates = the 100 most popular items (ties: lower id first), minus those in h
                  as in `full`; a target outside the 100 is a miss (rank = inf). Excluding h keeps
                  this protocol comparable with `full`: both rank only items a user could still be
                  recommended.
Negatives depend only on (the data, protocol, seed): drawn once per user, before any model is seen,
and cached per (fingerprint, split, protocol, seed), so every model is scored on identical lists.
Where a user has fewer than 100 eligible items (tiny catalogues), the list is shorter.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from models.batching import length_batches, pad_left
from models.errors import DataError, IncompatibleError, RecmergeError
from models.metrics import METRIC_KS, mean_metrics, per_user_metrics, rank_of_target

PROTOCOLS = ("full", "random100", "popular100", "top-popular100")
SAMPLED = ("random100", "popular100")
N_NEGATIVES = 100
N_TOP_POPULAR = 100
_SAMPLE_CHUNK = 1024  # users per sampling chunk; fixed, so lists never depend on a batch size
_CACHE_SIZE = 16

Scorer = Callable[[torch.Tensor], torch.Tensor]  # (B, T) left-padded histories -> (B, n_items)
Progress = Callable[[str, float], None]


@dataclass
class EvalData:
    """Everything about one split that does not depend on the model."""

    inputs: list[np.ndarray]  # model input per evaluated user (internal item ids)
    targets: np.ndarray  # (U,) the item to rank
    touched: list[np.ndarray]  # every item the user interacted with; negatives avoid all of them
    popularity: np.ndarray  # (n_items+1,) counts, index 0 unused
    n_items: int
    users: np.ndarray | None = None  # (U,) internal user index of each row
    cache_key: tuple | None = None  # (fingerprint, split): enables reuse of sampled lists across models

    def __post_init__(self):
        self.targets = np.asarray(self.targets, dtype=np.int64)
        self.popularity = np.asarray(self.popularity, dtype=np.float64)
        U = len(self.targets)
        if len(self.inputs) != U or len(self.touched) != U:
            raise DataError(f"inputs ({len(self.inputs)}), targets ({U}) and touched ({len(self.touched)}) "
                            "must have one entry per user")
        if U == 0:
            raise DataError("no users with a target to evaluate")
        if self.popularity.shape != (self.n_items + 1,):
            raise DataError(f"popularity has shape {self.popularity.shape}, expected ({self.n_items + 1},)")
        if self.targets.min() < 1 or self.targets.max() > self.n_items:
            raise DataError(f"targets must be item ids in 1..{self.n_items}")
        for name, rows in (("inputs", self.inputs), ("touched", self.touched)):
            flat = np.concatenate([np.asarray(r).reshape(-1) for r in rows])
            if len(flat) and (flat.min() < 1 or flat.max() > self.n_items):
                raise DataError(f"{name} must hold item ids in 1..{self.n_items}")
        if self.users is None:
            self.users = np.arange(U)


def eval_data(ds, split: str = "test") -> EvalData:
    """Pull the arrays of `split` ("valid" or "test") out of a PreparedDataset."""
    if split not in ("valid", "test"):
        raise DataError(f"split {split!r} cannot be evaluated; use 'valid' or 'test'")
    inputs, targets, touched, users = [], [], [], []
    need = 2 if split == "valid" else 1
    for u in range(ds.n_users):
        if len(ds.sequence(u)) < need:
            continue  # too short to hold out this split
        inp, tgt = ds.split(u, split)
        inputs.append(np.asarray(inp, dtype=np.int64))
        targets.append(int(tgt))
        touched.append(np.asarray(ds.sequence(u), dtype=np.int64))
        users.append(u)
    return EvalData(inputs, np.asarray(targets, dtype=np.int64), touched, ds.item_popularity(), ds.n_items,
                    users=np.asarray(users, dtype=np.int64), cache_key=(ds.fingerprint, split))


def restrict(data: EvalData, users: Sequence[int]) -> EvalData:
    """The rows of `data` whose user (internal index) is in `users`, in data's order: a part of a split that
    a caller fits on or selects on. Sampled protocols draw their own lists for the part (no cache key), so
    only `full` and `top-popular100` ranks equal the same rows' ranks in the whole split."""
    wanted = np.unique(np.asarray(users, dtype=np.int64))
    rows = np.flatnonzero(np.isin(data.users, wanted))
    if len(rows) != len(wanted):
        missing = np.setdiff1d(wanted, data.users)
        raise DataError(f"{len(missing)} of the {len(wanted)} users asked for have no row in this split "
                        f"(first: {int(missing[0])})")
    return EvalData([data.inputs[i] for i in rows], data.targets[rows], [data.touched[i] for i in rows],
                    data.popularity, data.n_items, users=data.users[rows])


def check_protocols(protocols: Sequence[str]) -> tuple[str, ...]:
    protocols = tuple(protocols)
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise RecmergeError(f"unknown protocol {unknown[0] if unknown else '(none)'}; known: {', '.join(PROTOCOLS)}")
    return tuple(dict.fromkeys(protocols))


# ---------------------------------------------------------------------------------------------- negatives

def sample_negatives(touched: Sequence[np.ndarray], n_items: int, n: int = N_NEGATIVES,
                     weights: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """(U, n) items drawn without replacement ∝ weights (uniform if None) from outside each user's
    touched set; 0 fills the slots a user has no eligible item left for.

    Exponential race (Efraimidis-Spirakis): the n smallest E_i / w_i with E_i ~ Exp(1) are a draw
    without replacement ∝ w, so a whole chunk of users is sampled with one top-k.
    """
    w = np.ones(n_items + 1) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n_items + 1,) or not np.isfinite(w).all() or (w < 0).any():
        raise DataError(f"sampling weights must be {n_items + 1} finite non-negative numbers")
    w = torch.from_numpy(w.astype(np.float32))
    w[0] = 0.0  # padding is never an item
    rng = np.random.default_rng(seed)
    k = min(n, n_items)
    out = np.zeros((len(touched), n), dtype=np.int64)
    for start in range(0, len(touched), _SAMPLE_CHUNK):
        rows = touched[start : start + _SAMPLE_CHUNK]
        B = len(rows)
        ww = w.expand(B, -1).clone()  # (B, n_items+1)
        rr, cc = _row_cols(rows)
        ww[rr, cc] = 0.0
        keys = torch.from_numpy(rng.standard_exponential((B, n_items + 1), dtype=np.float32)).div_(ww)
        keys.masked_fill_(ww == 0, torch.inf)  # ineligible: never among the k smallest finite keys
        kv, ki = torch.topk(keys, k, dim=1, largest=False)  # (B, k)
        ki[torch.isinf(kv)] = 0
        out[start : start + B, :k] = ki.numpy()
    return out


def _row_cols(rows: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices that mark each row's items in a (len(rows), n_items+1) matrix."""
    lens = [len(r) for r in rows]
    cols = np.concatenate([np.asarray(r, dtype=np.int64).reshape(-1) for r in rows]) if sum(lens) else \
        np.zeros(0, dtype=np.int64)
    return torch.from_numpy(np.repeat(np.arange(len(rows)), lens)), torch.from_numpy(cols)


def protocol_seed(seed: int, protocol: str) -> int:
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise RecmergeError(f"seed must be a non-negative integer, got {seed!r}")
    return int(np.random.SeedSequence([int(seed), PROTOCOLS.index(protocol)]).generate_state(1)[0])


_NEGATIVES_CACHE: OrderedDict[tuple, np.ndarray] = OrderedDict()


def negatives_for(data: EvalData, protocol: str, seed: int = 0) -> np.ndarray:
    """The (U, 100) negative lists of a sampled protocol, identical for every model."""
    if protocol not in SAMPLED:
        raise RecmergeError(f"protocol {protocol!r} has no sampled negatives; sampled: {', '.join(SAMPLED)}")
    key = None if data.cache_key is None else (*data.cache_key, protocol, int(seed))
    if key is not None and key in _NEGATIVES_CACHE:
        _NEGATIVES_CACHE.move_to_end(key)
        return _NEGATIVES_CACHE[key]
    weights = data.popularity if protocol == "popular100" else None
    # touched should hold input and target already; adding them makes that a guarantee, not a hope
    avoid = [np.concatenate([t, h, [g]]) for t, h, g in zip(data.touched, data.inputs, data.targets)]
    neg = sample_negatives(avoid, data.n_items, N_NEGATIVES, weights, protocol_seed(seed, protocol))
    neg.setflags(write=False)
    if key is not None:
        _NEGATIVES_CACHE[key] = neg
        while len(_NEGATIVES_CACHE) > _CACHE_SIZE:
            _NEGATIVES_CACHE.popitem(last=False)
    return neg


def clear_negatives_cache() -> None:
    _NEGATIVES_CACHE.clear()


def top_popular(popularity: np.ndarray, n: int = N_TOP_POPULAR) -> np.ndarray:
    """The n most popular item ids (ties: lower id first)."""
    order = np.argsort(-np.asarray(popularity[1:], dtype=np.float64), kind="stable")
    return order[:n] + 1


# ---------------------------------------------------------------------------------------------- scoring

def as_scorer(model, device: str | torch.device | None = None) -> tuple[Scorer, int | None, torch.device]:
    """A model (anything with next_item_scores) or a plain scorer callable -> (scorer, width cap, device)."""
    if isinstance(model, torch.nn.Module):
        if device is not None:
            model.to(device)
        dev = next(model.parameters()).device
        cap = getattr(getattr(model, "cfg", None), "max_len", None)
        return model.next_item_scores, cap, dev
    if hasattr(model, "next_item_scores"):
        return model.next_item_scores, None, torch.device(device or "cpu")
    if callable(model):
        return model, None, torch.device(device or "cpu")
    raise TypeError(f"cannot score with {type(model).__name__}: expected a model or a callable")


@contextmanager
def model_mode(model, train: bool = False):
    """Put a model in eval (or train) mode for the duration, then back to the caller's mode."""
    if not isinstance(model, torch.nn.Module):
        yield
        return
    was_training = model.training
    if was_training == train:  # train() walks every submodule: ~0.5 ms per call, twice per served batch
        yield
        return
    model.train(train)
    try:
        yield
    finally:
        model.train(was_training)


def padded_batches(histories: Sequence[np.ndarray], batch_size: int, max_width: int | None = None,
                   ) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(row indices, (B, T) left-padded tokens) in length order, each batch only as wide as it needs."""
    if batch_size < 1:
        raise RecmergeError(f"batch_size must be >= 1, got {batch_size}")
    lengths = [len(h) for h in histories]
    for idx in length_batches(lengths, batch_size):
        width = max(1, max(lengths[i] for i in idx))
        if max_width is not None:
            width = min(width, max_width)  # the model only reads its last max_len tokens anyway
        yield idx, pad_left([histories[i] for i in idx], width=width)


def history_mask(histories: Sequence[np.ndarray], n_items: int, device) -> torch.Tensor:
    """(B, n_items) bool, column c True where item c+1 occurs in the row's history."""
    mask = torch.zeros(len(histories), n_items + 1, dtype=torch.bool)
    rr, cc = _row_cols(histories)
    mask[rr, cc] = True
    return mask[:, 1:].to(device)


def user_ranks(scorer, data: EvalData, protocols: Sequence[str] = PROTOCOLS, seed: int = 0,
               batch_size: int = 256, device: str | torch.device | None = None,
               progress: Progress | None = None) -> dict[str, np.ndarray]:
    """{protocol: (U,) 0-based ranks, inf = miss}; rows follow data.targets."""
    protocols = check_protocols(protocols)
    score, cap, dev = as_scorer(scorer, device)
    negatives = {p: torch.from_numpy(negatives_for(data, p, seed).copy()) for p in protocols if p in SAMPLED}
    top_cols = torch.from_numpy(top_popular(data.popularity) - 1).to(dev)  # (100,) columns of the top items
    U, N = len(data.targets), data.n_items
    ranks = {p: np.empty(U, dtype=np.float64) for p in protocols}
    n_batches = -(-U // batch_size)
    with torch.inference_mode(), model_mode(scorer):
        for b, (idx, tokens) in enumerate(padded_batches(data.inputs, batch_size, cap)):
            scores = score(tokens.to(dev))  # (B, N)
            if tuple(scores.shape) != (len(idx), N):
                raise IncompatibleError(f"scorer returned scores of shape {tuple(scores.shape)}, "
                                        f"expected ({len(idx)}, {N}) for a dataset of {N} items")
            tcol = torch.from_numpy(data.targets[idx] - 1).to(dev)  # (B,)
            rows = torch.arange(len(idx), device=dev)
            first = torch.zeros_like(tcol)  # sampled candidate lists put the target in column 0
            unseen = None
            if "full" in protocols or "top-popular100" in protocols:
                unseen = ~history_mask([data.inputs[i] for i in idx], N, dev)  # (B, N)
                unseen[rows, tcol] = True  # the target is never excluded
            for p in protocols:
                if p == "full":
                    r = rank_of_target(scores, tcol, unseen)
                elif p == "top-popular100":
                    # Target first, then the top items other than the target; a target outside them is a miss.
                    is_target = top_cols[None] == tcol[:, None]  # (B, 100)
                    cand_scores = torch.cat([scores.gather(1, tcol[:, None]), scores[:, top_cols]], dim=1)
                    cand = torch.cat([is_target.any(1, keepdim=True), unseen[:, top_cols] & ~is_target], dim=1)
                    r = rank_of_target(cand_scores, first, cand)
                else:
                    neg = negatives[p][torch.from_numpy(idx)].to(dev)  # (B, 100), 0 = empty slot
                    cand = torch.cat([tcol[:, None] + 1, neg], dim=1)  # (B, 101) item ids, target first
                    cand_scores = scores.gather(1, (cand - 1).clamp(min=0))
                    r = rank_of_target(cand_scores, first, cand > 0)
                ranks[p][idx] = r.cpu().numpy()
            if progress is not None:
                progress("evaluate", (b + 1) / n_batches)
    return ranks


def evaluate_data(scorer, data: EvalData, protocols: Sequence[str] = PROTOCOLS, ks: Sequence[int] = METRIC_KS,
                  seed: int = 0, batch_size: int = 256, device=None,
                  progress: Progress | None = None) -> dict[str, dict[str, float]]:
    _check_ks(ks)
    ranks = user_ranks(scorer, data, protocols, seed, batch_size, device, progress)
    return {p: mean_metrics(r, ks) for p, r in ranks.items()}


def _check_ks(ks: Sequence[int]) -> None:
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise RecmergeError(f"cutoffs ks must be positive integers, got {tuple(ks)}")


def _check_model_fits(model, ds) -> None:
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "n_items", ds.n_items) != ds.n_items:
        raise IncompatibleError(f"model has {cfg.n_items} items, dataset has {ds.n_items}")


def evaluate(model, ds, split: str = "test", protocols: Sequence[str] = PROTOCOLS,
             ks: Sequence[int] = METRIC_KS, seed: int = 0, batch_size: int = 256, device=None,
             progress: Progress | None = None) -> dict[str, dict[str, float]]:
    """{protocol: {"ndcg@10", "hr@10", "ndcg@20", "hr@20", "mrr"}} averaged over the split's users."""
    protocols = check_protocols(protocols)
    _check_model_fits(model, ds)
    return evaluate_data(model, eval_data(ds, split), protocols, ks, seed, batch_size, device, progress)


def per_user_ndcg(model, ds, split: str = "test", protocol: str = "full", k: int = 10, seed: int = 0,
                  batch_size: int = 256, device=None, progress: Progress | None = None) -> np.ndarray:
    """(n evaluated users,) NDCG@k per user, in dataset user order: the input to error inconsistency."""
    _check_model_fits(model, ds)
    _check_ks((k,))
    ranks = user_ranks(model, eval_data(ds, split), (protocol,), seed, batch_size, device, progress)[protocol]
    return per_user_metrics(ranks, (k,))[f"ndcg@{k}"]


def popularity_scorer(popularity: np.ndarray) -> Scorer:
    """Baseline: every user gets the training popularity as scores (a floor any model should beat)."""
    pop = torch.as_tensor(np.asarray(popularity[1:], dtype=np.float32))

    def score(history: torch.Tensor) -> torch.Tensor:
        return pop.to(history.device).expand(history.shape[0], -1)

    return score


def load_for_dataset(path: str | os.PathLike, ds, device: str | torch.device = "cpu"):
    """load_model, refusing a checkpoint trained on another dataset (fingerprints must match)."""
    from models.checkpoint import check_trained_on, load_model, read_metadata

    check_trained_on(read_metadata(path), ds, str(path))
    return load_model(path, device=device)
