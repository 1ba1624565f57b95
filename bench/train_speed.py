"""Training speed on ml-1m: today's trainer against the one before it, both backbones, side by side.

"before" is the trainer as it was until this benchmark was rewritten: the post-LayerNorm backbone with its
output head (BackboneConfig's defaults: 2 heads, feed-forward 256, GELU), AdamW with weight decay 0.01,
and cross-entropy on the full (positions x items) logit matrix. "now" is what `recmerge train` ships
(TrainConfig's defaults: pre-LayerNorm, no head, feed-forward = hidden, ReLU, chunked cross-entropy).
Both train on the same batches of the same epoch, alternated so the machine's drift hits both alike; an
epoch's time is the measured seconds per token times the epoch's tokens (every window of every user).

    .venv/bin/python bench/train_speed.py --source ../shared/data/ml-1m --batches 12 --repeats 3 \
        --out docs/results/train_speed.md
"""

from __future__ import annotations

import argparse
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
from models.recipes import TrainBatch, recipe_class, recipe_options  # noqa: E402
from models.train import TrainConfig, backbone_config, build_samples  # noqa: E402


class Trainer:
    """One optimiser step on a batch, as the named trainer takes it."""

    def __init__(self, which: str, kind: str, n_items: int, max_len: int):
        torch.manual_seed(0)
        self.which = which
        if which == "before":
            self.model = SeqRecModel(BackboneConfig(n_items=n_items, kind=kind, max_len=max_len))
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.01)
        else:
            cfg = TrainConfig(backbone=kind, max_len=max_len)
            self.model = SeqRecModel(backbone_config(cfg, n_items))
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=cfg.betas,
                                         weight_decay=cfg.weight_decay)
        self.recipe = recipe_class("bert4rec")(recipe_options("bert4rec"), self.model)
        self.model.train()

    def loss(self, batch: TrainBatch) -> torch.Tensor:
        if self.which == "now":
            return self.recipe.loss(self.model, batch)[0]
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
    trainers = {w: Trainer(w, kind, ds.n_items, args.max_len) for w in ("before", "now")}
    samples = build_samples(ds.train_sequences(), args.max_len, causal=kind == "sasrec")
    lengths = np.array([len(s) for s in samples])
    epoch_tokens = int(lengths.sum())
    rng = np.random.default_rng(1)
    for t in trainers.values():  # warm-up: first-call allocations and kernel choices
        t.seconds(samples, length_batches(lengths, args.batch_size, rng)[:2], 0)
    per_token = {w: [] for w in trainers}
    for r in range(args.repeats):
        # A random draw of the epoch's batches, the same for both trainers: long and short alike.
        batches = length_batches(lengths, args.batch_size, rng)[: args.batches]
        tokens = sum(int(lengths[b].sum()) for b in batches)
        order = ("before", "now") if r % 2 == 0 else ("now", "before")
        for w in order:
            per_token[w].append(trainers[w].seconds(samples, batches, r) / tokens)
    epoch = {w: statistics.median(v) * epoch_tokens for w, v in per_token.items()}
    ratios = [b / n for b, n in zip(per_token["before"], per_token["now"])]
    return {"kind": kind, "samples": len(samples), "tokens": epoch_tokens, "epoch": epoch,
            "ratio": statistics.median(ratios), "ratios": ratios,
            "params": {w: t.model.n_params() for w, t in trainers.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="../shared/data/ml-1m")
    ap.add_argument("--data", help="an already prepared dataset directory (skips prepare)")
    ap.add_argument("--backbones", default="sasrec,bert4rec")
    ap.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    ap.add_argument("--max-len", type=int, default=200)
    ap.add_argument("--batches", type=int, default=12, help="batches per timing repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--out", help="write a Markdown report here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = PreparedDataset.load(args.data) if args.data else \
        prepare_dataset(args.source, Path(tempfile.mkdtemp(prefix="recmerge-bench-")) / "data")
    rows = [measure(ds, kind, args) for kind in args.backbones.split(",")]
    now_cfg = replace(TrainConfig(), max_len=args.max_len)
    lines = [
        "# Training speed on ml-1m: the trainer before and now, side by side", "",
        f"Command: `{' '.join(['.venv/bin/python'] + sys.argv)}`", "",
        f"Machine: {machine.line()}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}.", "",
        f"Dataset: {ds.n_users} users, {ds.n_items} items; batch {args.batch_size}, max_len {args.max_len}, "
        f"hidden {now_cfg.hidden}, {now_cfg.layers} layers. Epoch time = median seconds per token over "
        f"{args.repeats} draws of {args.batches} batches × the epoch's tokens; ratio = before / now per draw.", "",
        "| backbone | samples (windows) | tokens / epoch | before: s / epoch | now: s / epoch | speed-up "
        "(median, per draw) | parameters before / now |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['samples']} | {r['tokens']:,} | {r['epoch']['before']:.1f} | "
                     f"{r['epoch']['now']:.1f} | {r['ratio']:.2f}× ({', '.join(f'{x:.2f}' for x in r['ratios'])}) "
                     f"| {r['params']['before']:,} / {r['params']['now']:,} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
