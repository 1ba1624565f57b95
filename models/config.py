"""The backbone's configuration: one small typed dataclass, stored inside every checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from models.errors import CheckpointError

BACKBONES = ("bert4rec", "sasrec")
NORMS = ("post", "pre", "sasrec")
ACTIVATIONS = ("gelu", "relu")
POSITIONS = ("end", "start")
# What `recmerge train` (models/train.py TrainConfig) gives a design field left unset, per backbone, each
# measured in 60-minute runs (docs/results/accuracy-ml-1m.md): sasrec learns more with the original SASRec
# block and positions counted from the window's start (session 2026-12-07 10:19); bert4rec with the BERT
# block (LayerNorm after each residual, GELU, 2 heads, dropout 0.1; +0.0155 ± 0.0026 test paired over the
# pre-LN block, session 18:20) and positions from the end, its feed-forward as wide as hidden: BERT's 256
# cost 1.3x the epoch (17.7 s, over the 15 s goal) for −0.0025 ± 0.0025 validation.
DESIGN = {
    "sasrec": {"norm": "sasrec", "positions": "start", "heads": 1, "inner": 64, "dropout": 0.2,
               "activation": "relu"},
    "bert4rec": {"norm": "post", "positions": "end", "heads": 2, "inner": 64, "dropout": 0.1,
                 "activation": "gelu"},
}

DESIGN_FIELDS = tuple(DESIGN["sasrec"])  # every backbone's entry names the same fields


def design_help(name: str) -> str:
    """'sasrec 1, bert4rec 2': what an unset design field becomes, for help texts and API docs."""
    return ", ".join(f"{b} {d[name]}" for b, d in DESIGN.items())


# The fields a run copies from a checkpoint it continues (everything but n_items and kind).
SHAPE_FIELDS = ("hidden", "layers", "heads", "inner", "dropout", "max_len", "norm", "head", "activation", "positions")


@dataclass(frozen=True)
class BackboneConfig:
    n_items: int  # real items are 1..n_items; 0 is padding, n_items+1 is [MASK]
    kind: str = "bert4rec"  # bert4rec (bidirectional, cloze) | sasrec (causal, next-item)
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    inner: int = 256
    dropout: float = 0.2
    max_len: int = 200
    # The defaults below are the first design (BERT-style post-LayerNorm blocks, a projection head
    # before the tied item table), so checkpoints written before these fields existed read as they were
    # trained. `recmerge train` ships no head and ReLU, and per backbone its block and positions
    # (DESIGN above).
    # post: LN after each residual sum | pre: LN before each sub-layer, one final LN | sasrec: the original
    # SASRec code's block (models/backbone.py Block)
    norm: str = "post"
    head: bool = True  # a Linear+GELU+LN projection between the last block and the tied item table
    activation: str = "gelu"  # of the feed-forward
    # end: a position counts back from the window's last item (recency only) | start: it counts from the
    # window's first item, so for histories within max_len it says how many items the user had before.
    positions: str = "end"

    def __post_init__(self):
        if self.kind not in BACKBONES:
            raise ValueError(f"unknown backbone {self.kind!r}; known: {', '.join(BACKBONES)}")
        if self.n_items < 1:
            raise ValueError("n_items must be >= 1")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; known: {', '.join(NORMS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; known: {', '.join(ACTIVATIONS)}")
        if self.positions not in POSITIONS:
            raise ValueError(f"unknown positions {self.positions!r}; known: {', '.join(POSITIONS)}")
        if not isinstance(self.head, bool):
            raise ValueError(f"head must be true or false (got {self.head!r})")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.max_len < 2:
            raise ValueError("max_len must be >= 2")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError("dropout must be in [0, 1)")

    @property
    def mask_token(self) -> int:
        return self.n_items + 1

    @property
    def vocab(self) -> int:
        return self.n_items + 2

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BackboneConfig:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"backbone metadata is not JSON: {e}") from None
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise CheckpointError(f"backbone metadata has unknown fields: {sorted(unknown)}")
        try:
            return cls(**raw)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"backbone metadata is invalid: {e}") from None
