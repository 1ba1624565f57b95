"""`task-arithmetic`: θ = θ_base + α Σ w_i τ_i with task vectors τ_i = θ_i − θ_base."""

from __future__ import annotations

import torch
from pydantic import Field

from merging.methods.base import MergeMethod, NoOptions, TensorInputs, Weight, weighted_sum


class AlphaOptions(NoOptions):
    alpha: float = Field(1.0, allow_inf_nan=False, description="scale of the combined task vector")


def task_vectors(x: TensorInputs) -> list[torch.Tensor]:
    return [t - x.base for t in x.tensors]


class TaskArithmetic(MergeMethod):
    name = "task-arithmetic"
    summary = "base + α Σ w_i (θ_i − base)"
    Options = AlphaOptions
    ModelOptions = Weight
    needs_base = True

    def merge(self, x: TensorInputs) -> torch.Tensor:
        return x.base + weighted_sum(task_vectors(x), self.weights) * self.options.alpha
