"""Uniformity and alignment (Wang & Isola 2020) of item embeddings and sequence representations.

uniformity(X) = log mean_{i<j} exp(-t ||x_i - x_j||²) over L2-normalised rows (t = 2); lower = more
spread over the sphere. alignment(X, Y) = mean_i ||x_i - y_i||^α over L2-normalised positive pairs
(α = 2); lower = positives closer.

What is measured (`representation_metrics`):
- item_uniformity: the item table rows 1..n_items (padding and [MASK] left out).
- seq_uniformity: the sequence representation (hidden state at the last, [MASK], position, SPEC §3)
  of each evaluated user's input sequence, with the model in eval mode (what inference sees).
- seq_alignment: the DuoRec-unsupervised positive pair: the same input sequence passed twice with the
  model in train mode, so the two views differ only by their dropout masks; pairs = (view 1, view 2)
  of the same user. The dropout draws are seeded, so the number is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from models.evaluate import eval_data, model_mode, padded_batches

_ROWS = 1024  # rows per block when summing pairwise kernels, so memory stays O(_ROWS * N)


def uniformity(x: torch.Tensor, t: float = 2.0) -> float:
    """x (N, D), N >= 2 -> log of the mean Gaussian kernel over distinct pairs of normalised rows."""
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"uniformity needs an (N>=2, D) matrix, got {tuple(x.shape)}")
    z = F.normalize(x.double(), dim=1)
    n = z.shape[0]
    total = z.new_zeros(())
    for start in range(0, n, _ROWS):
        block = z[start : start + _ROWS]
        sq = (2.0 - 2.0 * block @ z.T).clamp(min=0.0)  # (b, N) squared distances of unit vectors
        k = torch.exp(-t * sq)
        # drop the self-pairs (diagonal) of this block
        rows = torch.arange(block.shape[0], device=block.device)
        k[rows, rows + start] = 0.0
        total += k.sum()
    return float(torch.log(total / (n * (n - 1))))


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> float:
    """x, y (N, D) positive pairs row by row -> mean ||x̂_i - ŷ_i||^alpha."""
    if x.shape != y.shape or x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"alignment needs two equal (N, D) matrices, got {tuple(x.shape)} and {tuple(y.shape)}")
    d = (F.normalize(x.double(), dim=1) - F.normalize(y.double(), dim=1)).norm(dim=1)
    return float(d.pow(alpha).mean())


def item_embeddings(model) -> torch.Tensor:
    """(n_items, D) the real items' rows of the (tied) item table."""
    return model.item_emb.weight[1 : model.cfg.n_items + 1].detach()


def sequence_representations(model, histories: Sequence[np.ndarray], train_mode: bool = False,
                             batch_size: int = 256) -> torch.Tensor:
    """(N, D) hidden state at the prediction position of each history, rows in input order."""
    dev = next(model.parameters()).device
    out = torch.empty(len(histories), model.cfg.hidden)
    with torch.no_grad(), model_mode(model, train=train_mode):
        for idx, tokens in padded_batches(histories, batch_size, model.cfg.max_len):
            h = model.encode(model.inference_tokens(tokens.to(dev)))[:, -1]  # (B, D)
            out[torch.from_numpy(idx)] = h.float().cpu()
    return out


def representation_metrics(model, ds, split: str = "test", max_users: int | None = 2048, seed: int = 0,
                           batch_size: int = 256) -> dict[str, float]:
    """{"item_uniformity", "seq_uniformity", "seq_alignment"} (see the module docstring)."""
    data = eval_data(ds, split)
    inputs = data.inputs
    if max_users is not None and len(inputs) > max_users:
        # A seeded subset: uniformity is a mean over pairs, so a few thousand users estimate it well.
        pick = np.sort(np.random.default_rng(seed).choice(len(inputs), max_users, replace=False))
        inputs = [inputs[i] for i in pick]
    dev = next(model.parameters()).device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        view1 = sequence_representations(model, inputs, train_mode=True, batch_size=batch_size)
        view2 = sequence_representations(model, inputs, train_mode=True, batch_size=batch_size)
    plain = sequence_representations(model, inputs, train_mode=False, batch_size=batch_size)
    return {
        "item_uniformity": uniformity(item_embeddings(model)),
        "seq_uniformity": uniformity(plain),
        "seq_alignment": alignment(view1, view2),
    }
