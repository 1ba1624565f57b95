"""The data functions of the merge methods that choose their coefficients on data, built from a prepared
dataset: the same for `recmerge merge` and for a merge job on the workers (merging/ itself reads no data).

    kw = merge_inputs("regmean", options, ds, backbone, device)   # {"grams": ...}, {"score": ...}, ...
    merge_checkpoints("regmean", paths, out, options=options, **kw)

- weight-search, greedy-soup: `score(state_dict)` = full-ranking validation NDCG@10 (core/scoring.py).
- regmean: `grams(state_dict)` = {every nn.Linear's weight name: XᵀX}, X the rows that layer receives
  (padding positions left out) when the model reads the validation inputs of a seeded sample of users.
- adamerging: `objective(params)` = on a seeded sample of users, the mean next-item cross-entropy of
  the validation target (`objective: cross-entropy`) or the mean entropy of the predicted next-item
  distribution (`objective: entropy`, needs no targets), through torch.func.functional_call, so it
  is differentiable in the merged parameters.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def sample_users(ds, users: int | None, seed: int, pool=None) -> list[int]:
    """A seeded sample of `users` users that have a validation target (all of them for None), in index order;
    drawn from `pool` (internal indices) when given."""
    eligible = np.flatnonzero(ds.lengths >= 3)
    if pool is not None:
        eligible = np.intersect1d(eligible, np.asarray(pool, dtype=np.int64))
    if users is not None and users < len(eligible):
        eligible = np.sort(np.random.default_rng(seed).choice(eligible, size=users, replace=False))
    return [int(u) for u in eligible]


def _validation_batches(ds, users: list[int], max_len: int, batch_size: int):
    """(histories (B, T) left-padded, targets (B,) columns) over the users' validation inputs."""
    from models.batching import pad_left

    out = []
    for at in range(0, len(users), batch_size):
        parts = [ds.split(u, "valid") for u in users[at:at + batch_size]]
        hist = [h[-max_len:] for h, _ in parts]
        out.append((pad_left(hist), torch.tensor([t - 1 for _, t in parts], dtype=torch.long)))
    return out


def gram_function(ds, backbone, users: int | None = 1000, seed: int = 0, device=None, batch_size: int = 128,
                  pool=None):
    """grams(state_dict) -> {"<module>.weight": XᵀX (in × in, float64)} for every nn.Linear of the model."""
    from models.backbone import SeqRecModel
    from models.train import resolve_device

    device = resolve_device(device)
    model = SeqRecModel(backbone).to(device).eval()
    batches = _validation_batches(ds, sample_users(ds, users, seed, pool), backbone.max_len, batch_size)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}

    def grams(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        model.load_state_dict(state)
        acc = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=device)
               for name, m in linears.items()}
        keep: list[torch.Tensor] = []  # the current batch's real (non-padding) positions

        def hook(name):
            def record(module, args, output):
                x = args[0]
                # Token-level inputs (B, T, in) keep their real positions only; others (the head sees one
                # state per sequence) keep every row.
                rows = x[keep[0]] if x.dim() == 3 and x.shape[:2] == keep[0].shape else x.reshape(-1, x.shape[-1])
                rows = rows.to(torch.float64)
                acc[name] += rows.T @ rows
            return record

        handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
        try:
            with torch.no_grad():
                for hist, _ in batches:
                    tokens = model.inference_tokens(hist.to(device))
                    keep[:] = [tokens != 0]
                    model.logits(model.encode(tokens)[:, -1])
        finally:
            for h in handles:
                h.remove()
        return {f"{name}.weight": g.cpu() for name, g in acc.items()}

    return grams


class _NextItem(nn.Module):
    """A module whose forward is the backbone's next-item scores, so functional_call can run it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, history):
        return self.model.next_item_scores(history)


def objective_function(ds, backbone, kind: str = "cross-entropy", users: int | None = 256, seed: int = 0,
                       device=None, batch_size: int = 128, pool=None):
    """objective(params) -> 0-d tensor, differentiable in `params` (the backbone's state-dict names)."""
    from torch.func import functional_call

    from models.backbone import SeqRecModel
    from models.train import resolve_device

    if kind not in ("cross-entropy", "entropy"):
        raise ValueError(f"objective {kind!r}: expected cross-entropy or entropy")
    device = resolve_device(device)
    net = _NextItem(SeqRecModel(backbone).to(device).eval())  # eval: no dropout, the objective is deterministic
    batches = [(h.to(device), t.to(device)) for h, t in
               _validation_batches(ds, sample_users(ds, users, seed, pool), backbone.max_len, batch_size)]
    n = sum(len(t) for _, t in batches)

    def objective(params: dict[str, torch.Tensor]) -> torch.Tensor:
        named = {f"model.{k}": v.to(device) for k, v in params.items()}
        total = 0.0
        for hist, target in batches:
            logits = functional_call(net, named, (hist,))
            if kind == "cross-entropy":
                total = total + nn.functional.cross_entropy(logits, target, reduction="sum")
            else:
                logp = logits.log_softmax(-1)
                total = total - (logp.exp() * logp).sum()
        return (total / n).cpu()

    return objective


def merge_inputs(method: str, options: dict | None, ds, backbone, device=None, pool=None) -> dict:
    """The keyword arguments `merge_checkpoints` needs for `method` beside its options: score, grams or
    objective (nothing for methods that read no data). `pool` (internal user indices) restricts every data
    function to those users' validation items: a method fitted on one part is then judged on the rest."""
    from core.scoring import validation_score
    from merging.methods import get_method

    cls = get_method(method)
    opts = cls.Options.model_validate(options or {})
    out = {}
    if cls.needs_score:
        out["score"] = validation_score(ds, backbone, device, users=pool)
    if cls.needs_grams:
        out["grams"] = gram_function(ds, backbone, users=opts.users, seed=opts.seed, device=device, pool=pool)
    if cls.needs_objective:
        out["objective"] = objective_function(ds, backbone, kind=opts.objective, users=opts.users, seed=opts.seed,
                                              device=device, pool=pool)
    return out


def fits_validation_targets(method: str, options: dict | None) -> bool:
    """Whether `method` with these options chooses anything by the validation items themselves (a score,
    or the cross-entropy objective): its validation figure is then in-sample and flatters it against a
    method that reads no targets. RegMean's Gram matrices and the entropy objective read inputs only."""
    from merging.methods import get_method

    cls = get_method(method)
    if cls.needs_score:
        return True
    return cls.needs_objective and cls.Options.model_validate(options or {}).objective == "cross-entropy"
