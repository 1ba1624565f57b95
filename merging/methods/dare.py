"""`dare` (Yu et al. 2024) on task vectors τ_i = θ_i − θ_base: drop each entry with probability p and
rescale the survivors by 1/(1−p), then combine with `linear` (task arithmetic) or `ties` (sign election
and disjoint mean, no magnitude trim).

The drop masks come from one torch.Generator per tensor, seeded from (seed, tensor name) and drawn in
model order, so a merge is reproducible and does not depend on the order tensors are visited."""

from __future__ import annotations

import hashlib
from typing import Literal

import torch
from pydantic import Field

from merging.methods.base import MergeMethod, TensorInputs, Weight, weighted_sum
from merging.methods.task_arithmetic import AlphaOptions, task_vectors
from merging.methods.ties import elect_and_average


class DareOptions(AlphaOptions):
    p: float = Field(0.5, ge=0.0, lt=1.0, description="drop probability of each task-vector entry")
    seed: int = Field(0, ge=0, description="seeds the drop masks together with each tensor's name")
    combine: Literal["linear", "ties"] = Field("linear", description="how the sparsified vectors combine")


def tensor_generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}\0{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def drop_and_rescale(tau: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    keep = torch.rand(tau.shape, generator=gen) >= p
    return torch.where(keep, tau / (1.0 - p), 0.0)


class Dare(MergeMethod):
    name = "dare"
    summary = "DARE: random drop + rescale of task vectors, then linear or TIES combination"
    Options = DareOptions
    ModelOptions = Weight
    needs_base = True
    elementwise = False  # the masks are drawn per whole tensor

    def merge(self, x: TensorInputs) -> torch.Tensor:
        o = self.options
        gen = tensor_generator(o.seed, x.name)
        taus = [drop_and_rescale(t, o.p, gen) for t in task_vectors(x)]
        combined = weighted_sum(taus, self.weights) if o.combine == "linear" else elect_and_average(taus, self.weights)
        return x.base + combined * o.alpha
