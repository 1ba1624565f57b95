"""DuoRec: backbone objective + λ·InfoNCE with model-level positives.

- duorec-unsup: the positive of a sequence is a second dropout pass over the same sequence.
- duorec-sup: the positive is another training sample with the same target item (itself if none).
- duorec: both losses, each anchored on the sample's own view. (DuoRec's code calls its final variant
  "us_x", which instead pairs the second dropout pass with the same-target sample in one loss; the SPEC
  asks for the sum of both losses, which is what this does.)

For sasrec the anchor view is the backbone pass's final state, which is exactly the view of the sample;
bert4rec's cloze input has random masks, so its anchor takes one more (final-position-only) pass.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from models.recipes.contrastive import ContrastiveOptions, ContrastiveRecipe, encode_views, view_rows


class SameTargetIndex:
    """For each training sample, a random other sample with the same target (last item), itself if none."""

    def __init__(self, samples: list[np.ndarray]):
        targets = np.array([int(s[-1]) for s in samples])
        self.order = np.argsort(targets, kind="stable")  # samples grouped by target
        grouped = targets[self.order]
        self.rank = np.empty(len(samples), dtype=np.int64)  # position of each sample in `order`
        self.rank[self.order] = np.arange(len(samples))
        lo = np.searchsorted(grouped, grouped, side="left")
        hi = np.searchsorted(grouped, grouped, side="right")
        self.start = lo[self.rank]  # where each sample's target group begins in `order`
        self.size = (hi - lo)[self.rank]

    def sample(self, index: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Indices of one same-target positive for each sample index."""
        start, size = self.start[index], self.size[index]
        own = self.rank[index] - start
        r = rng.integers(0, np.maximum(size - 1, 1))  # uniform among the size-1 others ...
        r = r + (r >= own)  # ... by skipping the sample itself
        return self.order[np.where(size > 1, start + r, self.rank[index])]


class DuoRecOptions(ContrastiveOptions):
    # Chosen on ml-1m validation in the fine-tune setting (docs/results/accuracy-ml-1m.md, option sweep):
    # λ 0.02 gave 0.1585 against 0.1478 at λ 0.1 (dot, τ 1 both); the variants without one of the two
    # positives inherit it unmeasured.
    cl_weight: float = Field(0.02, ge=0, description="λ, weight of the contrastive (InfoNCE) loss")


class DuoRec(ContrastiveRecipe):
    name = "duorec"
    Options = DuoRecOptions
    unsupervised = True
    supervised = True

    def setup(self, samples):
        self.samples = samples
        if self.supervised:
            self.same_target = SameTargetIndex(samples)

    def view_pairs(self, model, batch, h):
        rows = view_rows(batch.samples)
        reuse = self.cfg.kind == "sasrec"
        own_rows = [rows] * (1 + self.unsupervised - reuse)  # the anchor, and its second dropout pass
        sup_rows = []
        if self.supervised:
            positives = self.same_target.sample(batch.index, batch.rng)
            sup_rows = [view_rows([self.samples[j] for j in positives])]
        states = encode_views(model, *own_rows, *sup_rows)
        own = ([h[:, -1]] if reuse else []) + states[: len(own_rows)]
        pairs = []
        if self.unsupervised:
            pairs.append((own[0], own[1]))
        if self.supervised:
            pairs.append((own[0], states[-1]))
        return pairs


class DuoRecUnsup(DuoRec):
    name = "duorec-unsup"
    supervised = False


class DuoRecSup(DuoRec):
    name = "duorec-sup"
    unsupervised = False
