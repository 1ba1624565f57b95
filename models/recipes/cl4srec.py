"""CL4SRec: backbone objective + λ·InfoNCE between two augmented views of each sample, each view made by a
different random operator (crop, mask, reorder)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from models.recipes.augment import two_views
from models.recipes.contrastive import ContrastiveOptions, ContrastiveRecipe, encode_views, view_rows


class CL4SRecOptions(ContrastiveOptions):
    # Chosen on ml-1m validation in the fine-tune setting (docs/results/accuracy-ml-1m.md, option sweep):
    # λ 0.1 with dot/τ 1 pulled a converged sasrec from 0.158 to 0.146; λ 0.02 with cos (τ 0.2) kept 0.156.
    cl_weight: float = Field(0.02, ge=0, description="λ, weight of the contrastive (InfoNCE) loss")
    similarity: Literal["auto", "dot", "cos"] = Field(
        "cos", description="similarity of sequence representations: dot|cos (auto: dot for sasrec, cos for bert4rec)")
    crop_eta: float = Field(0.6, gt=0, le=1, description="η: a crop keeps ⌊η·n⌋ contiguous items")
    mask_gamma: float = Field(0.3, ge=0, le=1, description="γ: a mask hides ⌊γ·n⌋ items behind [MASK]")
    reorder_beta: float = Field(0.6, ge=0, le=1, description="β: a reorder shuffles ⌊β·n⌋ contiguous items")


class CL4SRec(ContrastiveRecipe):
    name = "cl4srec"
    Options = CL4SRecOptions

    def view_pairs(self, model, batch, h):
        o = self.options
        rates = {"crop": o.crop_eta, "mask": o.mask_gamma, "reorder": o.reorder_beta}
        v1, v2, _ = two_views(view_rows(batch.samples), rates, batch.rng, self.cfg.mask_token)
        z1, z2 = encode_views(model, v1, v2)
        return [(z1, z2)]
