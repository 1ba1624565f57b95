"""What each job is asked to do: the validated payloads of the five job kinds.

The API validates requests with these same classes before anything is queued, and the task validates
the stored payload again before any work (a payload written by an older version fails loudly).
Unknown fields are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from merging.fisher import FisherSettings
from models.config import DESIGN, design_help

DEFAULT_FISHER = FisherSettings(sampling="model", n=8)

EVAL_PROTOCOLS = ("full", "random100", "popular100", "top-popular100")


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PrepareSpec(Spec):
    source: str = Field(description="'ml-100k', or 'upload:<sha256>' of a raw interactions file in the store")
    filename: str | None = Field(None, description="the uploaded file's name (format detection looks at it)")
    name: str = "dataset"
    fmt: str | None = None
    min_user: int = Field(5, ge=1)
    min_item: int = Field(0, ge=0)


# A train job's epochs when the request names none: a short run, unless it gives max_minutes, which then
# alone ends the run, as `recmerge train --max-minutes` does without --epochs.
JOB_EPOCHS = 20


class TrainSpec(Spec):
    dataset_id: str
    recipe: str = "bert4rec"
    options: dict = Field(default_factory=dict, description="the recipe's hyper-parameters")
    epochs: int | None = Field(None, ge=1, le=1000, description=f"null: {JOB_EPOCHS}, or, with max_minutes, "
                               "as many as the budget allows")
    init_model_id: str | None = Field(None, description="start from this model (the fine-tune setting)")
    name: str | None = None
    backbone: Literal["bert4rec", "sasrec"] = "bert4rec"
    hidden: int = Field(64, ge=1, le=4096)
    layers: int = Field(2, ge=1, le=48)
    # Shape and optimisation defaults are `recmerge train`'s (models/train.py TrainConfig); a design field
    # left unset (null, or "auto") is the backbone's own, from models/config.py DESIGN.
    heads: int | None = Field(None, ge=1, le=64, description=f"attention heads; null: {design_help('heads')}")
    inner: int | None = Field(None, ge=1, le=16384,
                              description=f"feed-forward width; null: {design_help('inner')}")
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description=f"null: {design_help('dropout')}")
    norm: Literal["auto", "pre", "post", "sasrec"] = Field(
        "auto", description=f"block design; auto: the backbone's shipped one ({design_help('norm')})")
    head: bool = Field(False, description="a projection head before the tied item table")
    activation: Literal["relu", "gelu"] | None = Field(None, description=f"null: {design_help('activation')}")
    positions: Literal["auto", "end", "start"] = Field(
        "auto", description="position embeddings counted back from the last item (end) or from the first "
        f"(start); auto: the backbone's shipped choice ({design_help('positions')})")
    max_len: int = Field(200, ge=2, le=4096)
    batch_size: int = Field(32, ge=1, le=65536)
    lr: float = Field(1e-3, gt=0.0, le=1.0)
    patience: int = Field(0, ge=0)
    seed: int = 0
    max_minutes: float | None = Field(None, gt=0)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="the products in bfloat16 (bf16) or float32 (fp32); auto: bf16 where the worker's "
        "hardware makes it fast (CPUs with AMX, CUDA)")
    evaluate_test: bool = Field(True, description="also score the finished model on the test split")

    @property
    def run_epochs(self) -> int | None:
        """The epochs to give TrainConfig: None lets the time budget alone end the run."""
        if self.epochs is not None:
            return self.epochs
        return None if self.max_minutes else JOB_EPOCHS

    @model_validator(mode="after")
    def _heads_divide_hidden(self):
        heads = self.heads or DESIGN[self.backbone]["heads"]
        if self.hidden % heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({heads})")
        return self


class FisherSpec(Spec):
    model_id: str
    settings: FisherSettings = DEFAULT_FISHER
    parent: str | None = None  # the merge job waiting for this Fisher


class EvaluateSpec(Spec):
    model_id: str
    splits: list[Literal["valid", "test"]] = ["valid", "test"]
    protocols: list[Literal[EVAL_PROTOCOLS]] = ["full"]  # type: ignore[valid-type]
    parent: str | None = None


class MergeSpec(Spec):
    method: str = Field(description="a merge method name (uniform, weighted, fisher, task-arithmetic, ...)")
    model_ids: list[str] = Field(min_length=1, max_length=64)
    weights: list[float] | None = None
    base_model_id: str | None = None
    options: dict = Field(default_factory=dict, description="the method's options")
    fisher: FisherSettings | None = Field(None, description="how to estimate the Fishers (method fisher, and "
                                                            "weight-search with combine fisher; default: "
                                                            "sampling model, n 8)")
    finetune_epochs: int = Field(0, ge=0, le=100)
    evaluate: bool = True
    protocols: list[Literal[EVAL_PROTOCOLS]] = ["full"]  # type: ignore[valid-type]
    name: str | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.weights is not None and len(self.weights) != len(self.model_ids):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(self.model_ids)} models")
        if len(set(self.model_ids)) != len(self.model_ids):
            raise ValueError("model_ids lists a model twice")
        from merging.methods import METHODS

        method = METHODS.get(self.method)
        # fisher, and weight-search with combine fisher, weigh by Fishers the merge job estimates first
        uses_fisher = method is not None and method.fisher_use(self.options)
        if uses_fisher and self.fisher is None:
            self.fisher = DEFAULT_FISHER
        if not uses_fisher and self.fisher is not None:
            raise ValueError(f"fisher settings given, but method {self.method!r} uses no Fisher")
        return self
