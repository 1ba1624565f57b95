"""EHRec: DuoRec positives (both losses), with negatives restricted by a similarity threshold.

- ehrec-stat: a negative counts only when its similarity to the anchor is below SimThres k_stat
  (the q-quantile of in-batch similarities, averaged over the previous epoch).
- ehrec-learn: each view gets its own threshold k_learn = g(f(s)) from a small MLP g. A hard cut would
  give g no gradient, so each negative's exp term is weighted by the gate σ((k_learn - sim)/t); g is
  trained by the contrastive loss through the gate and by L_reg = (k_learn - k_stat)², weighted by
  `reg_weight`. The contrastive term alone always pulls k_learn down (fewer negatives, lower loss);
  L_reg is what holds it near k_stat. g lives outside the backbone: it is never saved in a checkpoint.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from models.recipes.contrastive import ContrastiveOptions, MeanStd, ThresholdNet, gate_logw
from models.recipes.duorec import DuoRec


class EHRecStat(DuoRec):
    name = "ehrec-stat"
    # Its own sweep kept λ 0.1 (the quantile q moved validation less than a standard error); DuoRec's
    # smaller λ was chosen for DuoRec alone.
    Options = ContrastiveOptions

    def negatives(self, sim, z, k):
        return torch.zeros_like(sim).masked_fill(sim >= k, -math.inf), None


class EHRecLearnOptions(ContrastiveOptions):
    g_hidden: int = Field(64, ge=1, description="width of g, the MLP that predicts each sequence's threshold")
    reg_weight: float = Field(1.0, ge=0, description="weight of L_reg = (k_learn - k_stat)^2")
    gate_temperature: float | None = Field(None, gt=0, description="t of the negative gate sigmoid((k_learn - sim)/t)"
                                                                    " (default: 1 with dot similarity, 0.05 with cos, "
                                                                    "whose values live in [-1, 1])")
    g_detach: bool = Field(True, description="feed g a detached representation: g learns its thresholds "
                                             "without also reshaping the encoder through them")


class EHRecLearn(DuoRec):
    name = "ehrec-learn"
    Options = EHRecLearnOptions

    def __init__(self, options, model):
        super().__init__(options, model)
        self.g = ThresholdNet(model.cfg.hidden, options.g_hidden).to(model.item_emb.weight.device)
        self.k_learn = MeanStd()

    def parameters(self):
        return list(self.g.parameters())

    def negatives(self, sim, z, k):
        o = self.options
        k_learn = self.g(z.detach() if o.g_detach else z, k)  # (2N,) one threshold per anchor view
        self.k_learn.add(k_learn)
        reg = (k_learn - k).square().mean()
        t = o.gate_temperature or (0.05 if self.similarity == "cos" else 1.0)
        return gate_logw(sim, k_learn, t), o.reg_weight * reg

    def end_epoch(self):
        mean, std = self.k_learn.pop()
        return {**super().end_epoch(), "k_learn_mean": mean, "k_learn_std": std}
