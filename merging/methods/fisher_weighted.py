"""`fisher` (thesis eq. 3.7): θ*⁽ʲ⁾ = Σ_i λ_i F_i⁽ʲ⁾ θ_i⁽ʲ⁾ / Σ_i λ_i F_i⁽ʲ⁾, entry by entry.

Where the Fisher mass Σ_i λ_i F_i⁽ʲ⁾ is below the floor ε (or zero) no model claims the entry, and the
λ-weighted average is used instead. With `normalize`, each F_i is first divided by its global L2 norm
over all tensors, so one model's Fisher cannot dominate just by being on a larger scale; the engine hands
the norms in (`set_fisher_norms`): from each Fisher's `sq_norm` metadata, or a pass over a file written
before that field (merging/fisher_norm.py)."""

from __future__ import annotations

import torch
from pydantic import Field

from merging.methods.base import MergeMethod, MergeOptionsError, NoOptions, TensorInputs, Weight, weighted_average


class FisherOptions(NoOptions):
    normalize: bool = Field(False, description="divide each Fisher by its global L2 norm first")
    epsilon: float = Field(0.0, ge=0.0, allow_inf_nan=False,
                           description="entries with Σ λ_i F_i below this use the weighted average")


class FisherWeighted(MergeMethod):
    name = "fisher"
    summary = "Fisher-weighted average per entry (eq. 3.7), weighted-average fallback below a floor"
    Options = FisherOptions
    ModelOptions = Weight
    needs_fisher = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.norms: list[float] | None = None
        self.fallback_entries = 0  # how many entries fell back, over the whole merge
        # Where they are, so the user can be told why: tensor -> {"entries", "zero" (no Fisher mass at all
        # rather than some below epsilon), "rows": {row: entries} for tensors of 2 or more dimensions}.
        self.fallback: dict[str, dict] = {}

    @property
    def needs_fisher_norms(self) -> bool:
        return self.options.normalize

    def set_fisher_norms(self, norms: list[float]) -> None:
        for i, n in enumerate(norms):
            if not n > 0:
                raise MergeOptionsError(f"fisher: Fisher {i + 1} is zero everywhere; it cannot be normalised")
        self.norms = list(norms)

    def merge(self, x: TensorInputs) -> torch.Tensor:
        lam = self.weights
        if self.options.normalize:
            if self.norms is None:
                raise RuntimeError("fisher: normalize is on but the Fisher norms were never set")
            scale = [w / n for w, n in zip(lam, self.norms)]
        else:
            scale = lam
        # den = Σ λ_i F_i (normalised), num = Σ λ_i F_i θ_i, accumulated in place: two passes over memory
        # per further model and no temporaries (the pass is memory-bound).
        den = x.fishers[0] * scale[0]
        num = den * x.tensors[0]
        for f, s, t in zip(x.fishers[1:], scale[1:], x.tensors[1:]):
            den.add_(f, alpha=s)
            num.addcmul_(f, t, value=s)
        out = num.div_(den)
        floor = self.options.epsilon
        if den.numel() and float(den.min()) <= floor:
            # Σ λ F >= 0, so "below the floor, or zero" is one comparison.
            idx = (den < floor if floor > 0 else den <= 0).nonzero(as_tuple=True)
            self.fallback_entries += len(idx[0])
            self._record_fallback(x, den, idx)
            out[idx] = weighted_average([t[idx] for t in x.tensors], lam)
        return out

    def _record_fallback(self, x: TensorInputs, den: torch.Tensor, idx: tuple[torch.Tensor, ...]) -> None:
        rec = self.fallback.setdefault(x.name, {"entries": 0, "zero": 0, "rows": {}})
        rec["entries"] += len(idx[0])
        rec["zero"] += int((den[idx] == 0).sum())
        if den.dim() >= 2:
            rows, counts = torch.unique(idx[0], return_counts=True)
            for r, c in zip((rows + x.start).tolist(), counts.tolist()):
                rec["rows"][r] = rec["rows"].get(r, 0) + c

    def describe(self):
        return super().describe() | ({"fisher_norms": self.norms} if self.options.normalize else {})
