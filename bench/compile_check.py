"""Does torch.compile speed up a training step here? One sasrec step (batch 32, sampled softmax, ml-1m
windows of max_len 200) eager against the encoder compiled by inductor, on one thread:

    .venv/bin/python bench/compile_check.py --data data/ml-1m --mode eager
    .venv/bin/python bench/compile_check.py --data data/ml-1m --mode default
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.backbone import SeqRecModel  # noqa: E402
from models.batching import length_batches  # noqa: E402
from models.data import PreparedDataset  # noqa: E402
from models.objectives import causal_batch, masked_ce  # noqa: E402
from models.train import TrainConfig, backbone_config, build_samples  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--mode", default="eager", help="eager, or a torch.compile mode (default, max-autotune, ...)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = PreparedDataset.load(args.data)
    bcfg = backbone_config(TrainConfig(backbone="sasrec"), ds.n_items)
    torch.manual_seed(0)
    model = SeqRecModel(bcfg)
    samples = build_samples(ds.train_sequences(), bcfg.max_len, True)
    batches = length_batches(np.array([len(s) for s in samples]), 32, np.random.default_rng(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if args.mode != "eager":
        # Batches are as wide as their longest window, so shapes vary: compile for dynamic shapes.
        model.encode = torch.compile(model.encode, dynamic=True, mode=None if args.mode == "default" else args.mode)

    def step(idx) -> None:
        loss, _ = masked_ce(model, causal_batch([samples[i] for i in idx], bcfg.max_len), negatives=512)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    for idx in batches[: args.warmup]:
        step(idx)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    run = batches[args.warmup : args.warmup + args.steps]
    for idx in run:
        step(idx)
    per_step = (time.perf_counter() - t0) / len(run)
    print(f"{args.mode}: first {args.warmup} steps {warm:.1f} s; then {per_step * 1000:.1f} ms per step "
          f"({per_step * len(batches):.1f} s per {len(batches)}-step epoch)")


if __name__ == "__main__":
    main()
