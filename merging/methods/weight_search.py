"""`weight-search`: per-model coefficients chosen by a validation score (higher is better), supplied by the
caller as `score(state_dict) -> float`, the same function greedy-soup gets.

The combination searched over is the option `combine`:
- `average`: θ = Σ c_i θ_i / Σ c_i. With two models the search is the full grid of `grid` points
  λ ∈ [0, 1], c = (λ, 1 − λ) (the Fisher-merging reference evaluates 51 points per pair).
- `task-vectors` (needs a base): θ = θ_base + Σ c_i (θ_i − θ_base), each c_i on a grid over [`low`, `high`]
  (default [0, 1]).
- `fisher` (needs one Fisher per model): the Fisher-weighted average with c_i multiplying model i's Fisher,
  θ = Σ c_i F_i θ_i / Σ c_i F_i entry by entry (the `fisher` method with weights c); an entry no model's
  Fisher covers (Σ c_i F_i = 0) takes the c-weighted average. Two models: the λ grid as for `average`.
Otherwise (three or more models averaged, or any task-vector search) a coordinate search: start from the
uniform point c_i = 1/M, then for each model in turn score the 1-D grid of its coefficient with the others
held, keep the best; repeat for `rounds` rounds, stopping after a round without a gain. A candidate
already scored is not scored again. Ties keep the earlier candidate.

The search holds the models in memory (the score function needs whole state dicts anyway); the final
merge then streams block by block like `weighted` / `task-arithmetic`, with the chosen coefficients, so
the file holds exactly the best candidate that was scored."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from pydantic import Field, model_validator

from merging.methods.base import FitInputs, MergeMethod, MergeOptionsError, NoOptions, TensorInputs, weighted_sum


class SearchOptions(NoOptions):
    combine: Literal["average", "task-vectors", "fisher"] = Field(
        "average", description="what the coefficients weigh: the raw parameters (average), task vectors "
                               "θ_i − θ_base (task-vectors, needs a base), or each model's Fisher (fisher)")
    grid: int = Field(51, ge=2, le=1001, description="grid points per coefficient")
    low: float = Field(0.0, allow_inf_nan=False, description="task-vectors: smallest coefficient on the grid")
    high: float = Field(1.0, allow_inf_nan=False, description="task-vectors: largest coefficient on the grid")
    rounds: int = Field(2, ge=1, le=20, description="coordinate-search rounds (more than two models, or task "
                                                    "vectors); it stops early after a round without a gain")

    @model_validator(mode="after")
    def _interval(self):
        if self.combine != "task-vectors" and (self.low, self.high) != (0.0, 1.0):
            raise ValueError("low and high set the task-vector interval; an average searches weights in [0, 1]")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self


def grid_values(low: float, high: float, n: int) -> list[float]:
    return [float(v) for v in torch.linspace(low, high, n, dtype=torch.float64)]


def search(n: int, values: list[float], score: Callable[[tuple[float, ...]], float], *, pair: bool,
           start: tuple[float, ...], rounds: int, average: bool = False,
           progress: Callable[[float], None] = lambda f: None) -> tuple[tuple[float, ...], float, list[dict]]:
    """The best coefficients, their score, and every candidate scored ({"coefficients", "score"}, in order).
    `pair`: the exhaustive grid c = (λ, 1 − λ) over `values`; else the coordinate search from `start`.
    `average`: coefficients that sum to 0 are no model and are skipped."""
    candidates: list[dict] = []
    seen: dict[tuple[float, ...], float] = {}
    total = len(values) if pair else 1 + rounds * n * len(values)

    def scored(c: tuple[float, ...]) -> float:
        if c not in seen:
            s = float(score(c))
            if not math.isfinite(s):
                raise MergeOptionsError(f"weight-search: the score function returned {s} for coefficients {list(c)}")
            seen[c] = s
            candidates.append({"coefficients": list(c), "score": s})
            progress(min(len(candidates) / total, 1.0))
        return seen[c]

    if pair:
        best = max((scored((v, 1.0 - v)), -k) for k, v in enumerate(values))  # ties: the first on the grid
        lam = values[-best[1]]
        return (lam, 1.0 - lam), best[0], candidates
    best_c, best_s = start, scored(start)
    for _ in range(rounds):
        gained = False
        for i in range(n):
            for v in values:
                c = best_c[:i] + (v,) + best_c[i + 1:]
                if average and sum(c) == 0:
                    continue
                s = scored(c)
                if s > best_s:
                    best_c, best_s, gained = c, s, True
        if not gained:
            break
    return best_c, best_s, candidates


class WeightSearch(MergeMethod):
    name = "weight-search"
    summary = "per-model coefficients chosen by a validation score: a λ grid for two models, else a coordinate search"
    Options = SearchOptions
    needs_score = True
    fits = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        o = self.options
        if o.combine != "task-vectors" and self.n_models < 2:
            raise MergeOptionsError("weight-search: averaging searches between at least two checkpoints")
        self.coefficients: list[float] | None = None
        self.record: dict = {}

    @classmethod
    def base_use(cls, options):
        return str(options.get("combine", "average")) == "task-vectors"

    @classmethod
    def fisher_use(cls, options):
        return str(options.get("combine", "average")) == "fisher"

    def combination(self, x: TensorInputs, c) -> torch.Tensor:
        c = list(c)
        if self.options.combine == "average":
            return weighted_sum(x.tensors, c) / sum(c)
        if self.options.combine == "fisher":
            den = weighted_sum(x.fishers, c)
            out = weighted_sum([f * t for f, t in zip(x.fishers, x.tensors)], c) / den
            uncovered = den <= 0
            if uncovered.any():
                out[uncovered] = (weighted_sum(x.tensors, c) / sum(c))[uncovered]
            return out
        return x.base + weighted_sum([t - x.base for t in x.tensors], c)

    def fit(self, states, base, inputs: FitInputs, progress, fishers=None) -> None:
        o, n = self.options, self.n_models
        average = o.combine != "task-vectors"  # a (Fisher-)weighted average: c and k·c are the same merge
        names = list(states[0])

        def score(c):
            state = {k: self.combination(TensorInputs(k, [s[k] for s in states],
                                                      base=None if base is None else base[k],
                                                      fishers=None if fishers is None else [f[k] for f in fishers]),
                                         c)
                     for k in names}
            return inputs.score(state)

        values = grid_values(0.0, 1.0, o.grid) if average else grid_values(o.low, o.high, o.grid)
        best, best_score, candidates = search(n, values, score, pair=average and n == 2,
                                              start=(1.0 / n,) * n, rounds=o.rounds, average=average,
                                              progress=progress)
        self.coefficients = list(best)
        self.record = {"coefficients": self.coefficients, "score": best_score, "candidates": candidates}

    def merge(self, x: TensorInputs) -> torch.Tensor:
        if self.coefficients is None:
            raise RuntimeError("weight-search: merge before the search chose its coefficients")
        return self.combination(x, self.coefficients)

    def fitted(self):
        return dict(self.record)

    def describe(self):
        return super().describe() | {"search": self.record}
