"""What every recipe is: a named training loss with typed options, on top of the backbone objective."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from models.backbone import SeqRecModel
from models.objectives import MaskedBatch, causal_batch, cloze_batch, masked_ce


class RecipeOptions(BaseModel):
    """Options of the backbone objective; recipes extend this. Unknown options are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mask_prob: float = Field(0.2, ge=0, le=1, description="cloze: share of items masked (bert4rec backbone)")
    last_item_share: float = Field(0.1, ge=0, le=1,
                                   description="cloze: share of samples that mask only their last item")
    # auto = sampled for sasrec, where every position carries a loss and the (positions x items) output
    # layer dominated a step (ml-1m, one thread: 2.9 s full vs 1.3 s sampled per 25,700-token batch, and
    # more validation NDCG@10 per minute: docs/results/accuracy-ml-1m.md); full for bert4rec, whose
    # loss sits at the ~20% masked positions only.
    loss: Literal["auto", "full", "sampled"] = Field(
        "auto", description="softmax over every item (full), over `negatives` shared uniform samples "
                            "(sampled), or auto: sampled for sasrec, full for bert4rec")
    negatives: int = Field(512, ge=1, description="sampled loss: negatives shared by a batch")


@dataclass
class TrainBatch:
    samples: list[np.ndarray]  # each a window of one user's training sequence (internal ids)
    index: np.ndarray  # indices of these samples in the epoch's sample list
    rng: np.random.Generator
    extra: dict = field(default_factory=dict)


class Recipe:
    name: ClassVar[str]
    Options: ClassVar[type[RecipeOptions]] = RecipeOptions

    def __init__(self, options: RecipeOptions, model: SeqRecModel):
        self.options = options
        self.cfg = model.cfg

    # Hooks a recipe may override --------------------------------------------------------------
    def setup(self, samples: list[np.ndarray]) -> None:
        """Called once with every training sample before the first epoch."""

    def parameters(self) -> list[torch.nn.Parameter]:
        """Trainable tensors beyond the backbone (kept out of the checkpoint)."""
        return []

    def start_epoch(self, epoch: int) -> None:
        pass

    def end_epoch(self) -> dict:
        """Per-epoch statistics to log (JSON-serialisable)."""
        return {}

    def carry_state(self) -> dict:
        """What the recipe carries from one epoch to the next besides its parameters (JSON-serialisable),
        saved with a resumable training state."""
        return {}

    def restore_state(self, state: dict) -> None:
        pass

    def loss(self, model: SeqRecModel, batch: TrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
        loss, _ = self.backbone_loss(model, batch)
        return loss, {}

    # Shared -----------------------------------------------------------------------------------
    def backbone_batch(self, batch: TrainBatch) -> MaskedBatch:
        if self.cfg.kind == "sasrec":
            return causal_batch(batch.samples, self.cfg.max_len)
        o = self.options
        return cloze_batch(batch.samples, self.cfg.max_len, self.cfg.mask_token, o.mask_prob,
                           o.last_item_share, batch.rng)

    def backbone_loss(self, model: SeqRecModel, batch: TrainBatch):
        loss = self.options.loss
        if loss == "auto":
            loss = "sampled" if self.cfg.kind == "sasrec" else "full"
        negatives = self.options.negatives if loss == "sampled" else None
        return masked_ce(model, self.backbone_batch(batch), negatives=negatives)

    def to_json(self) -> dict:
        return {"name": self.name, **self.options.model_dump()}
