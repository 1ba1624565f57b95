"""What the contrastive recipes share: sequence views, InfoNCE, SimThres (k_stat), the learned threshold
gate, per-epoch statistics, and the recipe template: backbone objective + λ·InfoNCE.

A view of a training sample w is its input w[:-1] (bert4rec: followed by [MASK]) whose target is w[-1];
its representation is the encoder's state at the final position. Two view sets of N samples make 2N
views: view i and view i+N are a positive pair, and each view's candidate negatives are the other 2N-2.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from models.backbone import SeqRecModel
from models.batching import pad_left
from models.recipes.base import Recipe, RecipeOptions, TrainBatch


class ContrastiveOptions(RecipeOptions):
    cl_weight: float = Field(0.1, ge=0, description="λ, weight of the contrastive (InfoNCE) loss")
    # "auto" and None follow the backbone: on ml-1m a converged bert4rec collapsed under dot similarity
    # at τ 1 (validation 0.120 -> 0.078 in one fine-tune epoch) and held under cos at τ 0.2 (0.119), while
    # sasrec did best with dot (docs/results/accuracy-ml-1m.md, option sweep).
    temperature: float | None = Field(None, gt=0, description="τ, InfoNCE temperature (default: 1 with dot "
                                                               "similarity, 0.2 with cos)")
    similarity: Literal["auto", "dot", "cos"] = Field(
        "auto", description="similarity of sequence representations: dot|cos (auto: dot for sasrec, cos for bert4rec)")
    mask_false_negatives: bool = Field(False, description="drop in-batch views with the same target item "
                                                          "from the negatives")
    quantile: float = Field(0.9, gt=0, lt=1, description="q of SimThres: k_stat is the q-quantile of in-batch "
                                                         "similarities (logged; ehrec's threshold)")
    hist_bins: int = Field(40, ge=2, description="bins of the logged similarity histogram")
    hist_range: float = Field(0.0, ge=0, description="the similarity histogram covers [-R, R]; "
                                                     "0 = 1 for cos, the hidden size for dot")


# InfoNCE ----------------------------------------------------------------------------------------


def pair_index(n_views: int, device=None) -> torch.Tensor:
    """(2N,) the positive of each view: view i pairs with view i+N (mod 2N)."""
    return torch.arange(n_views, device=device).roll(n_views // 2)


def candidate_negatives(n_views: int, device=None) -> torch.Tensor:
    """(2N, 2N) bool, True where view j is a negative of view i: neither i itself nor i's pair."""
    idx = torch.arange(n_views, device=device)
    return (idx[:, None] != idx[None]) & (pair_index(n_views, device)[:, None] != idx[None])


def resolved_similarity(option: str, backbone: str) -> str:
    return option if option != "auto" else ("dot" if backbone == "sasrec" else "cos")


def similarity(z: torch.Tensor, kind: str) -> torch.Tensor:  # (2N, D) -> (2N, 2N)
    if kind == "cos":
        z = F.normalize(z, dim=-1)
    return z @ z.T


def negative_similarities(sim: torch.Tensor) -> torch.Tensor:
    """(P,) the similarity of every candidate-negative pair, each unordered pair once."""
    n = sim.shape[0]
    upper = torch.ones(n, n, dtype=torch.bool, device=sim.device).triu(1)
    return sim[upper & candidate_negatives(n, sim.device)]


def same_target_logw(targets: torch.Tensor) -> torch.Tensor:
    """(2N,) targets -> (2N, 2N) log-weights dropping (-inf) views that share the anchor's target."""
    same = targets[:, None] == targets[None]
    return torch.zeros(same.shape, device=targets.device).masked_fill(same, -math.inf)


def info_nce(sim: torch.Tensor, temperature: float, neg_logw: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the 2N views of -log(e^{s_ip/τ} / (e^{s_ip/τ} + Σ_j w_ij e^{s_ij/τ})), j over the 2N-2
    candidate negatives. neg_logw (2N, 2N) holds log w_ij: -inf drops a negative, a log-sigmoid gates it
    softly; None keeps every candidate with weight 1."""
    n = sim.shape[0]
    logits = sim / temperature
    pos = logits.gather(1, pair_index(n, sim.device)[:, None])  # (2N, 1)
    logw = torch.zeros_like(logits).masked_fill(~candidate_negatives(n, sim.device), -math.inf)
    if neg_logw is not None:
        logw = logw + neg_logw
    denom = torch.logsumexp(torch.cat([pos, logits + logw], dim=1), dim=1)
    return (denom - pos[:, 0]).mean()


# Views --------------------------------------------------------------------------------------------


def view_rows(samples: list[np.ndarray]) -> np.ndarray:
    """(B, W) the samples' inputs w[:-1], left-padded to the longest (at least one column)."""
    width = max(1, max(len(s) for s in samples) - 1)
    return pad_left([s[:-1] for s in samples], width=width).numpy()


def encode_views(model: SeqRecModel, *rows: np.ndarray, chunks: int = 8) -> list[torch.Tensor]:
    """Final-position states (B_i, D) of several sets of left-padded view inputs (B_i, W_i).

    All views go through the encoder together, sorted by length and cut into `chunks` groups, each only
    as wide as its longest member: extra left padding does not change a final state, and views differ a
    lot in length (crops, same-target positives of any length). Only the last position is computed, and
    no logits: a view needs neither."""
    device = model.item_emb.weight.device
    sizes = [len(r) for r in rows]
    width = max(r.shape[1] for r in rows)
    pool = np.zeros((sum(sizes), width), dtype=np.int64)  # every set left-padded to one width
    start = 0
    for r in rows:
        pool[start : start + len(r), width - r.shape[1] :] = r
        start += len(r)
    lengths = np.count_nonzero(pool, axis=1)
    order = np.argsort(lengths, kind="stable")
    parts = []
    for idx in np.array_split(order, min(chunks, len(order))):
        w = max(1, int(lengths[idx].max()))
        tokens = model.inference_tokens(torch.from_numpy(pool[idx, width - w :]).to(device))
        parts.append(model.encode(tokens, last_only=True)[:, 0])  # (len(idx), D)
    z = torch.cat(parts)[torch.from_numpy(np.argsort(order)).to(device)]  # back to pool order
    return list(z.split(sizes))


# SimThres and the learned threshold -------------------------------------------------------------


class SimThres:
    """k_stat, the q-quantile of in-batch negative similarities. The threshold used during an epoch is the
    mean of the previous epoch's batch quantiles; in the first epoch each batch uses its own quantile."""

    def __init__(self, q: float):
        self.q = q
        self.previous: float | None = None
        self.batch_quantiles: list[float] = []
        self.used: list[float] = []

    def observe(self, similarities: torch.Tensor) -> float:
        """Record one batch's similarities; return the threshold for this batch."""
        k = torch.quantile(similarities.detach().float(), self.q).item()
        self.batch_quantiles.append(k)
        threshold = k if self.previous is None else self.previous
        self.used.append(threshold)
        return threshold

    def end_epoch(self) -> dict:
        if self.batch_quantiles:
            self.previous = float(np.mean(self.batch_quantiles))
        used = float(np.mean(self.used)) if self.used else None
        self.batch_quantiles, self.used = [], []
        # k_stat: this epoch's average, the next epoch's threshold; k_threshold: what this epoch used.
        return {"k_stat": self.previous, "k_threshold": used}


class SimilarityHistogram:
    """Counts of similarities over fixed bins (values outside the range land in the edge bins)."""

    def __init__(self, bins: int, lo: float, hi: float):
        self.bins, self.lo, self.hi = bins, lo, hi
        self.counts = torch.zeros(bins, dtype=torch.int64)

    def add(self, values: torch.Tensor) -> None:
        idx = ((values.detach().float() - self.lo) * (self.bins / (self.hi - self.lo))).floor()
        idx = idx.clamp_(0, self.bins - 1).long()
        self.counts += torch.bincount(idx, minlength=self.bins).cpu()

    def pop(self) -> dict:
        edges = np.linspace(self.lo, self.hi, self.bins + 1)
        out = {"edges": [round(float(e), 6) for e in edges], "counts": self.counts.tolist()}
        self.counts.zero_()
        return out


class ThresholdNet(nn.Module):
    """g: a sequence representation -> its own similarity threshold k_learn.

    g predicts an offset from the current k_stat, so the similarity's scale (dot products in the tens,
    cosines below one) needs no learning and g starts where SimThres is; L_reg = (k_learn - k_stat)²
    is then the squared offset. The output layer starts small but non-zero so L_reg has a gradient."""

    def __init__(self, hidden: int, width: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, width)
        self.fc2 = nn.Linear(width, 1)
        nn.init.normal_(self.fc2.weight, std=0.01)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, z: torch.Tensor, k_stat: float) -> torch.Tensor:  # (M, D) -> (M,)
        return k_stat + self.fc2(F.gelu(self.fc1(z))).squeeze(-1)


def gate_logw(sim: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """log σ((k_i - s_ij)/t): a soft "s_ij is below view i's threshold" that passes a gradient to k."""
    return F.logsigmoid((k[:, None] - sim) / temperature)


class MeanStd:
    """Running mean and standard deviation of many values, without keeping them."""

    def __init__(self):
        self.n, self.sum, self.sumsq = 0, 0.0, 0.0

    def add(self, values: torch.Tensor) -> None:
        v = values.detach().double()
        self.n += v.numel()
        self.sum += v.sum().item()
        self.sumsq += v.square().sum().item()

    def pop(self) -> tuple[float | None, float | None]:
        if not self.n:
            return None, None
        mean = self.sum / self.n
        std = math.sqrt(max(self.sumsq / self.n - mean * mean, 0.0))
        self.n, self.sum, self.sumsq = 0, 0.0, 0.0
        return mean, std


# The recipe template ----------------------------------------------------------------------------


class ContrastiveRecipe(Recipe):
    """Backbone objective + λ·Σ InfoNCE over the view pairs a subclass builds. Subclasses choose the
    views (`view_pairs`) and may reweight the negatives (`negatives`)."""

    Options = ContrastiveOptions

    def __init__(self, options: ContrastiveOptions, model: SeqRecModel):
        super().__init__(options, model)
        self.similarity = resolved_similarity(options.similarity, model.cfg.kind)
        self.temperature = options.temperature or (0.2 if self.similarity == "cos" else 1.0)
        r = options.hist_range or (1.0 if self.similarity == "cos" else float(model.cfg.hidden))
        self.k_stat = SimThres(options.quantile)
        self.hist = SimilarityHistogram(options.hist_bins, -r, r)

    def view_pairs(self, model: SeqRecModel, batch: TrainBatch, h: torch.Tensor,
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Pairs of view sets, (N, D) each, row i of both from sample i. h (B, T, D) is the backbone
        pass; for sasrec its final state is exactly the view of each sample and may be reused."""
        raise NotImplementedError

    def negatives(self, sim: torch.Tensor, z: torch.Tensor, k: float,
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Log-weights (2N, 2N) of the candidate negatives (None = all kept) and a regulariser (or None),
        added to the loss unweighted by λ."""
        return None, None

    def loss(self, model, batch):
        o = self.options
        loss, h = self.backbone_loss(model, batch)
        logs = {"backbone_loss": loss.item()}
        targets = torch.as_tensor(np.array([int(s[-1]) for s in batch.samples]), device=h.device)
        targets = torch.cat([targets, targets])  # a view's partner always shares its target
        cl, reg, kept = 0.0, 0.0, []
        for z1, z2 in self.view_pairs(model, batch, h):
            z = torch.cat([z1, z2])  # (2N, D)
            sim = similarity(z, self.similarity)  # (2N, 2N)
            observed = negative_similarities(sim.detach())
            self.hist.add(observed)
            k = self.k_stat.observe(observed)
            # Selection sees similarities detached: it chooses negatives, it does not shape representations.
            logw, more = self.negatives(sim.detach(), z, k)
            if logw is not None:
                kept.append(logw.exp()[candidate_negatives(len(z), z.device)].mean().item())
            if o.mask_false_negatives:
                fn = same_target_logw(targets)
                logw = fn if logw is None else logw + fn
            cl = cl + info_nce(sim, self.temperature, logw)
            if more is not None:
                reg = reg + more
        logs["cl_loss"] = cl.item() if torch.is_tensor(cl) else cl
        if kept:
            logs["negatives_kept"] = float(np.mean(kept))
        if torch.is_tensor(reg):
            logs["reg_loss"] = reg.item()
        return loss + o.cl_weight * cl + reg, logs

    def end_epoch(self) -> dict:
        return {**self.k_stat.end_epoch(), "similarity_histogram": self.hist.pop()}

    def carry_state(self) -> dict:
        return {"k_stat_previous": self.k_stat.previous}  # the next epoch's SimThres threshold

    def restore_state(self, state: dict) -> None:
        self.k_stat.previous = state.get("k_stat_previous")
