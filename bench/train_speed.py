"""Training speed on ml-1m: today's trainer against the one before it, both backbones, side by side.

"before" is the trainer as it was until this benchmark was rewritten: the post-LayerNorm backbone with its
output head (BackboneConfig's defaults: 2 heads, feed-forward 256, GELU), AdamW with weight decay 0.01,
and cross-entropy on the full (positions x items) logit matrix. "now" is what `recmerge train` ships
(TrainConfig's defaults: no head, chunked cross-entropy, each backbone's block from models/config.py DESIGN);
"narrow" is "now" with the pre-LayerNorm narrow block both backbones shipped before they got their own.
"torch-kernels" is "now" with the kernels it had before 2026-12-07: torch's own dropout and, for the
sampled softmax, the (positions x negatives) logits written out with an (M, k) accidental-hit compare —
what models/dropout.py and the chunked sampled cross-entropy replaced. (Since then "before" also runs on
the new dropout: its module is the same class.) "now-fp32" is "now" with every product in float32:
"now" uses the shipped precision (`auto`: bfloat16 products on a CPU with AMX, models/precision.py).
Both train on the same batches of the same epoch, alternated so the machine's drift hits both alike; an
epoch's time is the measured seconds per token times the epoch's tokens (every window of every user).

    .venv/bin/python bench/train_speed.py --source ../shared/data/ml-1m --batches 12 --repeats 3 \
        --out docs/results/train_speed.md
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import machine  # noqa: E402
from models.backbone import SeqRecModel  # noqa: E402
from models.batching import length_batches  # noqa: E402
from models.config import BackboneConfig  # noqa: E402
from models.data import PreparedDataset, prepare_dataset  # noqa: E402
from models.dropout import Dropout  # noqa: E402
from models.precision import mixed_precision, resolve_precision  # noqa: E402
from models.recipes import TrainBatch, recipe_class, recipe_options  # noqa: E402
from models.train import TrainConfig, backbone_config, build_samples  # noqa: E402


def torch_sampled_ce(model: SeqRecModel, z: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """The sampled softmax as it was computed before the chunked kernel: full (M, k + 1) logits."""
    n = model.cfg.n_items
    table = model.item_emb.weight[1 : n + 1]
    neg = torch.randint(0, n, (k,))
    own = (z * table[labels]).sum(1) + model.out_bias[labels]
    negs = torch.addmm(model.out_bias[neg], z, table[neg].T) + math.log(n / k)
    negs = negs.masked_fill(labels[:, None] == neg[None, :], float("-inf"))
    return F.cross_entropy(torch.cat([own[:, None], negs], dim=1), torch.zeros_like(labels))


TRAINERS = ("before", "torch-kernels", "now-fp32", "narrow", "now")
# "narrow": "now" with the pre-LayerNorm narrow block (one head, feed-forward = hidden, ReLU, dropout 0.2) that
# bert4rec shipped until 2026-12-07 18:30 and sasrec until 12:50, before each got its own block
# (models/config.py DESIGN).
NARROW = {"norm": "pre", "heads": 1, "activation": "relu", "dropout": 0.2}  # and inner = hidden


class Trainer:
    """One optimiser step on a batch, as the named trainer takes it."""

    def __init__(self, which: str, kind: str, n_items: int, max_len: int, shape: dict):
        torch.manual_seed(0)
        self.which = which
        if which not in TRAINERS:
            raise SystemExit(f"unknown trainer {which!r}; known: {', '.join(TRAINERS)}")
        if which == "before":
            self.model = SeqRecModel(BackboneConfig(n_items=n_items, kind=kind, max_len=max_len,
                                                    hidden=shape.get("hidden", 64)))
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.01)
        else:
            design = {**NARROW, "inner": shape.get("hidden", TrainConfig.hidden)} if which == "narrow" else {}
            cfg = TrainConfig(backbone=kind, max_len=max_len, **{**design, **shape})
            self.model = SeqRecModel(backbone_config(cfg, n_items))
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=cfg.betas,
                                         weight_decay=cfg.weight_decay)
        # Only "now" and "narrow" run at the shipped precision; every other trainer is float32 throughout.
        self.low = resolve_precision(TrainConfig.precision, torch.device("cpu")) if which in ("now", "narrow") \
            else None
        if which == "torch-kernels":
            for module in list(self.model.modules()):
                for name, child in list(module.named_children()):
                    if isinstance(child, Dropout):
                        setattr(module, name, torch.nn.Dropout(child.p))
        self.recipe = recipe_class("bert4rec")(recipe_options("bert4rec"), self.model)
        self.model.train()

    def loss(self, batch: TrainBatch) -> torch.Tensor:
        if self.which in ("now", "now-fp32", "narrow") or (self.which == "torch-kernels" and not self.model.causal):
            with mixed_precision(self.model, self.low):
                return self.recipe.loss(self.model, batch)[0]
        if self.which == "torch-kernels":  # sasrec: the shipped sampled loss, computed the old way
            mb = self.recipe.backbone_batch(batch)
            rows, cols = mb.positions.unbind(1)
            z = self.model.encode(mb.tokens)[rows, cols]
            return torch_sampled_ce(self.model, z, mb.labels, self.recipe.options.negatives)
        mb = self.recipe.backbone_batch(batch)  # the old objective: full logits, then cross-entropy
        h = self.model.encode(mb.tokens)
        rows, cols = mb.positions.unbind(1)
        return F.cross_entropy(self.model.logits(h[rows, cols]), mb.labels)

    def seconds(self, samples, batches, seed: int) -> float:
        rng = np.random.default_rng(seed)
        t0 = time.perf_counter()
        for idx in batches:
            loss = self.loss(TrainBatch([samples[i] for i in idx], idx, rng))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
            self.opt.step()
        return time.perf_counter() - t0


def measure(ds, kind: str, args) -> dict:
    shape = {k: v for k, v in (("hidden", args.hidden), ("inner", args.inner)) if v is not None}
    trainers = {w: Trainer(w, kind, ds.n_items, args.max_len, shape) for w in args.trainers}
    samples = build_samples(ds.train_sequences(), args.max_len, causal=kind == "sasrec")
    lengths = np.array([len(s) for s in samples])
    epoch_tokens = int(lengths.sum())
    rng = np.random.default_rng(1)
    # Warm-up: first-call allocations and kernel choices. A training run meets every batch width in its
    # first epoch, and bfloat16 products pay oneDNN's set-up once per shape, so the warm-up covers the
    # widths: a batch of each width class (multiples of 8) before the timed draws.
    warm = length_batches(lengths, args.batch_size, None)
    by_width = {}
    for b in warm:
        by_width.setdefault(-(-int(lengths[b].max()) // 8), b)
    for t in trainers.values():
        t.seconds(samples, list(by_width.values()), 0)
    per_token = {w: [] for w in trainers}
    for r in range(args.repeats):
        # A random draw of the epoch's batches, the same for both trainers: long and short alike.
        batches = length_batches(lengths, args.batch_size, rng)[: args.batches]
        tokens = sum(int(lengths[b].sum()) for b in batches)
        order = list(trainers) if r % 2 == 0 else list(trainers)[::-1]
        for w in order:
            per_token[w].append(trainers[w].seconds(samples, batches, r) / tokens)
    epoch = {w: statistics.median(v) * epoch_tokens for w, v in per_token.items()}
    ratios = {w: [b / n for b, n in zip(per_token[w], per_token["now"])] for w in trainers if w != "now"}
    return {"kind": kind, "samples": len(samples), "tokens": epoch_tokens, "epoch": epoch, "ratios": ratios,
            "params": {w: t.model.n_params() for w, t in trainers.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="../shared/data/ml-1m")
    ap.add_argument("--data", help="an already prepared dataset directory (skips prepare)")
    ap.add_argument("--backbones", default="sasrec,bert4rec")
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--max-len", type=int, default=200)
    ap.add_argument("--hidden", type=int, help="the model width (default: TrainConfig's)")
    ap.add_argument("--inner", type=int, help="the feed-forward width of 'now' (default: TrainConfig's)")
    ap.add_argument("--batches", type=int, default=12, help="batches per timing repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--trainers", default=",".join(TRAINERS),
                    help="which trainers to time side by side ('now' always)")
    ap.add_argument("--out", help="write a Markdown report here")
    args = ap.parse_args()
    args.trainers = [w for w in TRAINERS if w in args.trainers.split(",") or w == "now"]
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = PreparedDataset.load(args.data) if args.data else \
        prepare_dataset(args.source, Path(tempfile.mkdtemp(prefix="recmerge-bench-")) / "data")
    rows = [measure(ds, kind, args) for kind in args.backbones.split(",")]
    now_cfg = replace(TrainConfig(), max_len=args.max_len,
                      **{k: v for k, v in (("hidden", args.hidden), ("inner", args.inner)) if v is not None})
    lines = [
        "# Training speed on ml-1m: the trainer before and now, side by side", "",
        f"Command: `{' '.join(['.venv/bin/python'] + sys.argv)}`", "",
        f"Machine: {machine.line()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}; shipped precision "
        f"`{TrainConfig.precision}` = {resolve_precision(TrainConfig.precision, torch.device('cpu')) or 'float32'} "
        "here.", "",
        f"Dataset: {ds.n_users} users, {ds.n_items} items; batch {args.batch_size}, max_len {args.max_len}, "
        f"hidden {now_cfg.hidden}, {now_cfg.layers} layers. Epoch time = median seconds per token over "
        f"{args.repeats} draws of {args.batches} batches × the epoch's tokens; speed-up = other / now per draw "
        "(median, then each draw).", "",
        "| backbone | samples (windows) | tokens / epoch | " + " | ".join(f"{w}: s / epoch" for w in args.trainers)
        + " | " + " | ".join(f"now vs {w}" for w in args.trainers if w != "now") + " | parameters (now) |",
        "|---|---|---|" + "---|" * (2 * len(args.trainers)),
    ]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['samples']} | {r['tokens']:,} | "
                     + " | ".join(f"{r['epoch'][w]:.1f}" for w in args.trainers) + " | "
                     + " | ".join(f"{statistics.median(v):.2f}× ({', '.join(f'{x:.2f}' for x in v)})"
                                  for v in r["ratios"].values())
                     + f" | {r['params']['now']:,} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
