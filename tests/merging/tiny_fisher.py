"""A tiny float64 model and sequences that reach every Fisher code path: shared by the Fisher tests and the
device-parity tests (tests/test_cuda.py), which must import nothing beyond models/ and merging/."""

from __future__ import annotations

import torch

from models.backbone import SeqRecModel
from models.config import BackboneConfig

N_ITEMS, HIDDEN = 16, 8
# Varied lengths; one longer than max_len (truncated), one with a repeated item, one of length 1.
SEQS = [[3, 3, 5, 3, 7], [1], [2, 9, 4], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [16, 1, 2, 3], [4, 8],
        [7, 7, 2, 11, 6, 15]]
TARGETS = [4, 2, 16, 1, 5, 9, 3]
# (sampling, n): n > HIDDEN takes the eigen-decomposition path, n <= HIDDEN the direct one.
SELECTIONS = [("exact", None), ("topk", 5), ("topk", 12), ("random", 4), ("random", 11), ("model", 6),
              ("model", 13), ("target", None)]


def tiny_model(kind: str, seed: int = 0, **design) -> SeqRecModel:
    """design: BackboneConfig fields beyond the first design's (norm, positions, ...)."""
    torch.manual_seed(seed)
    cfg = BackboneConfig(n_items=N_ITEMS, kind=kind, hidden=HIDDEN, layers=2, heads=2, inner=16, max_len=8,
                         dropout=0.3, **design)
    model = SeqRecModel(cfg).double()
    with torch.no_grad():  # fresh LayerNorms and biases are all 1 / 0: move them to a generic point
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.item_emb.weight[0].zero_()
    return model.eval()
