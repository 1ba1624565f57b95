"""`uniform` (model soup): θ* = (1/M) Σ θ_i."""

from merging.methods.base import MergeMethod, TensorInputs, weighted_average


class Uniform(MergeMethod):
    name = "uniform"
    summary = "plain average of the checkpoints (model soup)"

    def merge(self, x: TensorInputs):
        return weighted_average(x.tensors, [1.0] * len(x.tensors))
