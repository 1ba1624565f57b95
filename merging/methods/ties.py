"""`ties` (TIES-merging, Yadav et al. 2023) on task vectors τ_i = θ_i − θ_base:
1. trim: keep each τ_i's top `density` share of entries by magnitude, zero the rest;
2. elect: per entry, the sign of the summed mass Σ w_i τ_i;
3. disjoint mean: average (weighted by w_i) only the entries whose sign agrees with the elected one;
θ = θ_base + α · merged. Trimming ranks a whole tensor, so this method is not elementwise."""

from __future__ import annotations

import torch
from pydantic import Field

from merging.methods.base import MergeMethod, TensorInputs, Weight
from merging.methods.task_arithmetic import AlphaOptions, task_vectors


class TiesOptions(AlphaOptions):
    density: float = Field(0.2, gt=0.0, le=1.0, description="share of each task vector's entries kept")


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the round(density · n) largest-magnitude entries (at least one)."""
    n = tau.numel()
    k = max(1, round(density * n))
    if k >= n:
        return tau
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.topk(tau.abs().reshape(-1), k, sorted=False).indices] = True
    return torch.where(keep.view(tau.shape), tau, 0.0)


def elect_and_average(taus: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Sign election by summed weighted mass, then the weighted mean of the agreeing non-zero entries."""
    weighted = [t * w for t, w in zip(taus, weights)]
    sign = torch.sign(sum(weighted))
    num = torch.zeros_like(taus[0])
    den = torch.zeros_like(taus[0])
    for t, wt, w in zip(taus, weighted, weights):
        agree = (torch.sign(t) == sign) & (t != 0)
        num += torch.where(agree, wt, 0.0)
        den += agree * w
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), 0.0)


class Ties(MergeMethod):
    name = "ties"
    summary = "TIES: trim task vectors, elect signs, disjoint mean"
    Options = TiesOptions
    ModelOptions = Weight
    needs_base = True
    elementwise = False

    def merge(self, x: TensorInputs) -> torch.Tensor:
        taus = [trim(t, self.options.density) for t in task_vectors(x)]
        return x.base + elect_and_average(taus, self.weights) * self.options.alpha
