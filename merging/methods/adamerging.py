"""`adamerging` (after Yang et al. 2024, AdaMerging): task arithmetic whose coefficients are learnt, one per
model and per group of tensors, θ_p = θ_base,p + Σ_i λ_{i,g(p)} (θ_i,p − θ_base,p), by a few Adam steps
on a differentiable objective of the merged parameters that the caller supplies, `objective(params) -> 0-d
tensor` (lower is better; core/merge_inputs.py builds the validation next-item cross-entropy on a user
sample, or the unsupervised entropy of the predicted next-item distribution, AdaMerging's own objective).

Options:
- `granularity`: `tensor` (one λ per model and tensor, AdaMerging's layer-wise form; default), `block`
  (per transformer block, and per top-level module outside the blocks) or `model` (one λ per model);
- `steps` (default 20), `lr` (default 0.01): the Adam steps; `init` (default 0.3, as AdaMerging starts);
  after each step the coefficients are clipped to [`low`, `high`] (default [0, 1]);
- `objective`, `users`, `seed`: which objective and on how many users (a seeded sample) the caller
  computes it; the method records them.
The learnt coefficients, the objective at every step and after the last one are recorded; the merge itself
then streams like task-arithmetic."""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator

from merging.methods.base import FitInputs, MergeMethod, MergeOptionsError, NoOptions, TensorInputs, weighted_sum


class AdaMergingOptions(NoOptions):
    objective: Literal["cross-entropy", "entropy"] = Field(
        "cross-entropy", description="validation next-item cross-entropy, or the prediction entropy (no targets)")
    granularity: Literal["tensor", "block", "model"] = Field("tensor", description="one coefficient per model and ...")
    steps: int = Field(20, ge=1, le=10_000, description="Adam steps")
    lr: float = Field(0.01, gt=0.0, le=10.0, allow_inf_nan=False, description="Adam learning rate")
    init: float = Field(0.3, allow_inf_nan=False, description="every coefficient's starting value")
    low: float = Field(0.0, allow_inf_nan=False, description="coefficients are clipped to [low, high] after each step")
    high: float = Field(1.0, allow_inf_nan=False)
    users: int = Field(256, ge=1, le=10_000_000, description="users whose validation inputs the objective reads")
    seed: int = Field(0, ge=0, description="seed of that user sample")

    @model_validator(mode="after")
    def _interval(self):
        if not self.low <= self.init <= self.high or not self.low < self.high:
            raise ValueError(f"need low < high and init within them (got low {self.low}, init {self.init}, "
                             f"high {self.high})")
        return self


def group_of(name: str, granularity: str) -> str:
    if granularity == "tensor":
        return name
    if granularity == "model":
        return "all"
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]


class AdaMerging(MergeMethod):
    name = "adamerging"
    summary = "task arithmetic with per-model, per-tensor coefficients learnt by Adam on a data objective"
    Options = AdaMergingOptions
    needs_base = True
    needs_objective = True
    fits = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.groups: list[str] = []
        self.lam: torch.Tensor | None = None  # (models, groups)
        self.record: dict = {}

    def _merged(self, base, taus, lam, index) -> dict[str, torch.Tensor]:
        return {k: base[k] + sum(lam[i, index[k]] * t[k] for i, t in enumerate(taus)) for k in base}

    def fit(self, states, base, inputs: FitInputs, progress, fishers=None) -> None:
        o = self.options
        index: dict[str, int] = {}
        for k in base:
            g = group_of(k, o.granularity)
            if g not in self.groups:
                self.groups.append(g)
            index[k] = self.groups.index(g)
        taus = [{k: s[k] - base[k] for k in base} for s in states]
        lam = torch.full((self.n_models, len(self.groups)), o.init, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([lam], lr=o.lr)
        losses = []

        def evaluate(lam_now) -> torch.Tensor:
            params = self._merged(base, taus, lam_now.to(torch.float32), index)
            loss = inputs.objective(params)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise MergeOptionsError(f"adamerging: the objective must return a 0-d tensor, got {loss!r:.60}")
            if not math.isfinite(value := float(loss.detach())):
                raise MergeOptionsError(f"adamerging: the objective returned {value} at step {len(losses)}")
            return loss

        for step in range(o.steps):
            loss = evaluate(lam)
            if not loss.requires_grad:
                raise MergeOptionsError("adamerging: the objective is not differentiable in the merged parameters")
            losses.append(float(loss.detach()))
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                lam.clamp_(o.low, o.high)
            progress((step + 1) / (o.steps + 1))
        with torch.no_grad():
            final = float(evaluate(lam))
        self.lam = lam.detach()
        self.record = {"coefficients": {g: [float(v) for v in self.lam[:, j]] for j, g in enumerate(self.groups)},
                       "losses": losses, "final_loss": final}

    def merge(self, x: TensorInputs) -> torch.Tensor:
        if self.lam is None:
            raise RuntimeError("adamerging: merge before the coefficients were learnt")
        j = self.groups.index(group_of(x.name, self.options.granularity))
        c = [float(v) for v in self.lam[:, j].to(torch.float32)]
        return x.base + weighted_sum([t - x.base for t in x.tensors], c)

    def fitted(self):
        return dict(self.record)

    def describe(self):
        return super().describe() | {"learned": self.record}
