"""The one interface every merge method implements.

A method declares its parameters (global `Options`, per-model `ModelOptions`, both pydantic models with
defaults) and which extra inputs it needs (a base checkpoint, Fishers, a score function); it then does
only math, on the tensors of one tensor name at a time. Reading, checking and writing files live in
merging/merge.py and merging/io.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.errors import IncompatibleError


class MergeOptionsError(IncompatibleError):
    """Options, weights or inputs that do not fit the chosen method."""


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Weight(NoOptions):
    weight: float = Field(1.0, ge=0.0, allow_inf_nan=False, description="this model's share (w_i or λ_i)")


@dataclass
class TensorInputs:
    """Everything a method sees for one tensor name (or one block of its rows), in the compute dtype."""

    name: str
    tensors: list[torch.Tensor]  # θ_i, one per model
    base: torch.Tensor | None = None  # θ_base, for task-vector methods
    fishers: list[torch.Tensor] | None = None  # F_i, same shape as θ_i
    start: int = 0  # the block's first row within the whole tensor (row-blocked elementwise merges)


def _validate(schema: type[BaseModel], values: dict[str, Any], method: str, where: str) -> BaseModel:
    try:
        return schema.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        if not err["loc"]:  # a rule between options (a model validator): its own sentence says it all
            raise MergeOptionsError(f"{method}: {err['msg'].removeprefix('Value error, ')}") from None
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            known = ", ".join(schema.model_fields) or "none"
            raise MergeOptionsError(f"{method}: unknown {where} {loc!r} (known: {known})") from None
        raise MergeOptionsError(f"{method}: {where} {loc!r}: {err['msg']} (got {err.get('input')!r})") from None


Score = Callable[[dict[str, torch.Tensor]], float]


@dataclass
class FitInputs:
    """What the caller supplies to the methods that learn their coefficients from data (merging/ holds no
    data code: these are computed by the caller, e.g. core/merge_inputs.py from a prepared dataset).

    score(state_dict) -> float: a validation score of a candidate, higher is better (weight-search).
    grams(state_dict) -> {linear weight name: G = XᵀX}: each nn.Linear's input Gram matrix (in × in) on a
        sample of the data, for one model (regmean).
    objective(params) -> 0-d tensor: a differentiable loss of the merged model's parameters, lower is
        better (adamerging)."""

    score: Score | None = None
    grams: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    objective: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None


class MergeMethod:
    """A merge method. `merge(x)` returns a new tensor and never writes to `x`'s tensors: `merge_state_dicts`
    hands it the caller's own tensors (tests/merging/test_methods.py checks every registered method)."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    ModelOptions: ClassVar[type[BaseModel]] = NoOptions
    needs_base: ClassVar[bool] = False
    needs_fisher: ClassVar[bool] = False
    needs_score: ClassVar[bool] = False
    needs_grams: ClassVar[bool] = False
    needs_objective: ClassVar[bool] = False
    # Methods that learn coefficients from the whole models first (`fit`), then merge in one streamed pass.
    fits: ClassVar[bool] = False
    # Elementwise methods may be fed a tensor in row blocks, so memory need not hold whole tensors.
    elementwise: ClassVar[bool] = True

    def __init__(self, n_models: int, options: dict[str, Any] | None = None,
                 model_options: list[dict[str, Any]] | None = None):
        if n_models < 1:
            raise MergeOptionsError(f"{self.name}: needs at least one checkpoint")
        if model_options is not None and len(model_options) != n_models:
            raise MergeOptionsError(f"{self.name}: got per-model options for {len(model_options)} models, "
                                    f"but {n_models} checkpoints")
        self.n_models = n_models
        self.options = _validate(self.Options, options or {}, self.name, "option")
        self.model_options = [_validate(self.ModelOptions, mo, self.name, f"model {i + 1} option")
                              for i, mo in enumerate(model_options or [{}] * n_models)]
        if self.weights is not None and sum(self.weights) <= 0:
            raise MergeOptionsError(f"{self.name}: weights sum to 0; at least one must be positive")

    @property
    def weights(self) -> list[float] | None:
        if "weight" not in self.ModelOptions.model_fields:
            return None
        return [mo.weight for mo in self.model_options]

    @classmethod
    def base_use(cls, options: dict[str, Any]) -> bool:
        """Whether these (raw, maybe not yet valid) options make the method work on task vectors."""
        return cls.needs_base

    @classmethod
    def fisher_use(cls, options: dict[str, Any]) -> bool:
        """Whether these (raw, maybe not yet valid) options make the method weigh by Fishers."""
        return cls.needs_fisher

    @classmethod
    def uses_data(cls) -> bool:
        """Whether the caller has to read the dataset to supply this method's inputs."""
        return cls.needs_score or cls.needs_grams or cls.needs_objective

    @property
    def needs_fisher_norms(self) -> bool:
        return False

    def fit(self, states: list[dict[str, torch.Tensor]], base: dict[str, torch.Tensor] | None, inputs: FitInputs,
            progress: Callable[[float], None], fishers: list[dict[str, torch.Tensor]] | None = None) -> None:
        """Learn what `merge` needs from the whole models (in the compute dtype; their Fishers too where the
        method weighs by them); only where `fits`."""
        raise NotImplementedError

    def fitted(self) -> dict[str, Any]:
        """What `fit` chose, for the MergeResult's stats (describe() records it in the file)."""
        return {}

    def merge(self, x: TensorInputs) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What the output's `merge` metadata records about this method's settings."""
        return {"options": self.options.model_dump(), "weights": self.weights}


def weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ w_i t_i as separate multiply and add kernels: a fused multiply-add would round differently in a
    vectorised body than in its scalar tail, and row-block streaming must match a whole-tensor merge."""
    acc = tensors[0] * weights[0]
    for t, w in zip(tensors[1:], weights[1:]):
        acc += t * w
    return acc


def weighted_average(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return weighted_sum(tensors, weights) / sum(weights)
