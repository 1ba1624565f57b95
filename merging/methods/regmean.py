"""`regmean` (Jin et al. 2023, "Dataless knowledge fusion by merging weights of language models"): each
nn.Linear weight is merged in closed form so that the merged layer maps every model's own inputs as that
model's layer does, in the least-squares sense. With X_i the inputs model i's layer receives on a sample of
the data and G_i = X_iᵀX_i (in × in), and W_i the weight as (in × out) = the stored (out × in) transposed:

    W* = argmin_W Σ_i ‖X_i W − X_i W_i‖²  =  (Σ_i G_i)⁻¹ Σ_i G_i W_i

Options:
- `alpha` ∈ (0, 1], default 0.9: each G_i is first replaced by α G_i + (1 − α) diag(G_i), shrinking the
  off-diagonal (input correlations) towards a per-input weighting; α = 1 is the exact least-squares form
  above, and smaller α moves the result towards a per-input-column weighted average.
- `ridge` ≥ 0, default 1e-6: r = ridge × the mean diagonal entry of Σ_i G̃_i is added to every G̃_i as r/M · I,
  so input directions no sample reaches (a singular sum) get the plain average of the models' weights.
- `users`, `seed`: the size and seed of the user sample the caller computes the Gram matrices on (the
  method only records them; core/merge_inputs.py reads them).
Biases and every other tensor (embeddings, LayerNorms, the output bias) are plainly averaged.
The Gram matrices come from the caller, `grams(state_dict) -> {weight name: G}`, once per model."""

from __future__ import annotations

import torch
from pydantic import Field

from merging.methods.base import FitInputs, MergeMethod, MergeOptionsError, NoOptions, TensorInputs, weighted_average


class RegMeanOptions(NoOptions):
    alpha: float = Field(0.9, gt=0.0, le=1.0, description="scale of the Gram matrices' off-diagonal entries")
    ridge: float = Field(1e-6, ge=0.0, allow_inf_nan=False,
                         description="regulariser towards the plain average, relative to the mean diagonal entry")
    users: int = Field(1000, ge=1, le=10_000_000, description="users whose validation inputs give the Gram matrices")
    seed: int = Field(0, ge=0, description="seed of that user sample")


def scaled_gram(g: torch.Tensor, alpha: float) -> torch.Tensor:
    return g * alpha + torch.diag(torch.diagonal(g)) * (1.0 - alpha)


class RegMean(MergeMethod):
    name = "regmean"
    summary = "linear layers in closed form from each model's input Gram matrices (RegMean), the rest averaged"
    Options = RegMeanOptions
    needs_grams = True
    fits = True
    elementwise = False  # a linear weight is solved as a whole

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.grams: dict[str, list[torch.Tensor]] | None = None

    def fit(self, states, base, inputs: FitInputs, progress, fishers=None) -> None:
        per_model = []
        for i, state in enumerate(states):
            g = inputs.grams(state)
            per_model.append(g)
            progress((i + 1) / len(states))
        names = list(per_model[0])
        for i, g in enumerate(per_model[1:], 2):
            if set(g) != set(names):
                raise MergeOptionsError(f"regmean: model {i}'s Gram matrices are for {sorted(g)}, model 1's for "
                                        f"{sorted(names)}")
        self.grams = {}
        for name in names:
            w = states[0].get(name)
            if w is None or w.dim() != 2:
                raise MergeOptionsError(f"regmean: a Gram matrix was given for {name!r}, which is not a linear "
                                        "layer's weight of these models")
            for i, g in enumerate(per_model, 1):
                m = g[name]
                if m.shape != (w.shape[1], w.shape[1]):
                    raise MergeOptionsError(f"regmean: model {i}'s Gram matrix of {name!r} has shape "
                                            f"{tuple(m.shape)}, the layer takes {w.shape[1]} inputs")
                if not torch.isfinite(m).all():
                    raise MergeOptionsError(f"regmean: model {i}'s Gram matrix of {name!r} holds NaN or Inf")
            self.grams[name] = [scaled_gram(g[name].to(torch.float64), self.options.alpha) for g in per_model]

    def merge(self, x: TensorInputs) -> torch.Tensor:
        if self.grams is None:
            raise RuntimeError("regmean: merge before the Gram matrices were given")
        if x.name not in self.grams:
            return weighted_average(x.tensors, [1.0] * len(x.tensors))
        grams, m = self.grams[x.name], len(x.tensors)
        total = sum(grams)
        r = self.options.ridge * float(torch.diagonal(total).mean())
        eye = torch.eye(total.shape[0], dtype=torch.float64)
        rhs = sum((g + eye * (r / m)) @ w.to(torch.float64).T for g, w in zip(grams, x.tensors))
        try:
            solved = torch.linalg.solve(total + eye * r, rhs)
        except RuntimeError:  # torch.linalg.LinAlgError: the summed Gram matrix is singular
            raise MergeOptionsError(f"regmean: the summed Gram matrix of {x.name!r} is singular; give a ridge > 0 "
                                    "(or a larger user sample)") from None
        return solved.T.to(x.tensors[0].dtype)

    def fitted(self):
        return {"solved": sorted(self.grams or {})}

    def describe(self):
        return super().describe() | {"solved": sorted(self.grams or {})}
