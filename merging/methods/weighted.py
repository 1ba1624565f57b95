"""`weighted`: θ* = Σ w_i θ_i / Σ w_i."""

from merging.methods.base import MergeMethod, TensorInputs, Weight, weighted_average


class Weighted(MergeMethod):
    name = "weighted"
    summary = "weighted average, θ* = Σ w_i θ_i / Σ w_i"
    ModelOptions = Weight

    def merge(self, x: TensorInputs):
        return weighted_average(x.tensors, self.weights)
