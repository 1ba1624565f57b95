"""Training speed of the bert4rec recipe on ml-1m, length-aware batches vs plain shuffled batches,
measured side by side in one process; optionally a budgeted training run for test NDCG@10.

    .venv/bin/python bench/train_speed.py --source ../shared/data/ml-1m --steps 20 --repeats 3 \
        [--train-minutes 30 --out docs/results/train_speed.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import machine  # noqa: E402
from models.backbone import SeqRecModel  # noqa: E402
from models.batching import length_batches  # noqa: E402
from models.data import PreparedDataset, prepare_dataset  # noqa: E402
from models.recipes import TrainBatch, recipe_class, recipe_options  # noqa: E402
from models.train import TrainConfig, backbone_config, build_samples, train  # noqa: E402


def step_rate(model, recipe, opt, samples, batches, rng) -> float:
    """Sequences per second over the given batches (forward, backward, optimizer step)."""
    model.train()
    n = 0
    t0 = time.perf_counter()
    for idx in batches:
        loss, _ = recipe.loss(model, TrainBatch([samples[i] for i in idx], idx, rng))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(idx)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="../shared/data/ml-1m")
    ap.add_argument("--data", help="an already prepared dataset directory (skips prepare)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-len", type=int, default=200)
    ap.add_argument("--steps", type=int, default=20, help="batches per timing repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--train-minutes", type=float, default=0.0, help="also train with this budget")
    ap.add_argument("--backbone", default="bert4rec")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", help="write a Markdown report here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="recmerge-bench-"))
    ds = PreparedDataset.load(args.data) if args.data else prepare_dataset(args.source, tmp / "data")
    cfg = TrainConfig(max_len=args.max_len, batch_size=args.batch_size, backbone=args.backbone)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = SeqRecModel(backbone_config(cfg, ds.n_items))
    recipe = recipe_class("bert4rec")(recipe_options("bert4rec"), model)
    samples = build_samples(ds.train_sequences(), cfg.max_len, model.causal)
    lengths = np.array([len(s) for s in samples])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    n_batches = int(np.ceil(len(samples) / cfg.batch_size))

    rates = {"length-aware": [], "shuffled": []}
    step_rate(model, recipe, opt, samples, length_batches(lengths, cfg.batch_size, rng)[:3], rng)  # warm-up
    for _ in range(args.repeats):
        aware = length_batches(lengths, cfg.batch_size, rng)[: args.steps]
        perm = rng.permutation(len(samples))
        plain = [perm[i : i + cfg.batch_size] for i in range(0, len(perm), cfg.batch_size)][: args.steps]
        # Alternate the two so machine noise hits both alike.
        rates["length-aware"].append(step_rate(model, recipe, opt, samples, aware, rng))
        rates["shuffled"].append(step_rate(model, recipe, opt, samples, plain, rng))
    med = {k: statistics.median(v) for k, v in rates.items()}
    lines = [
        "# Training speed: bert4rec on ml-1m", "",
        f"Command: `{' '.join(['.venv/bin/python'] + sys.argv)}`", "",
        f"Machine: {machine.line()}", "",
        f"Dataset: {ds.n_users} users, {ds.n_items} items, {len(samples)} training samples "
        f"(windows of ≤{cfg.max_len}), mean length {lengths.mean():.1f}; batch {cfg.batch_size}, "
        f"hidden {cfg.hidden}, {cfg.layers} layers, {cfg.heads} heads, max_len {cfg.max_len}.", "",
        f"| batching | sequences/s (median of {args.repeats} × {args.steps} batches) | est. epoch time (s) |",
        "|---|---|---|",
    ]
    for k, v in med.items():
        lines.append(f"| {k} | {v:.0f} | {len(samples) / v:.1f} |")
    lines += ["", f"Length-aware / shuffled speed ratio: **{med['length-aware'] / med['shuffled']:.2f}×** "
              f"({n_batches} batches per epoch).", ""]

    if args.train_minutes > 0:
        out = tmp / "model.safetensors"
        tcfg = TrainConfig(max_len=args.max_len, batch_size=args.batch_size, backbone=args.backbone,
                           epochs=1000, patience=0, max_minutes=args.train_minutes, lr=args.lr)
        res = train(ds, tcfg, out, show_bar=True)
        from models.checkpoint import load_model
        from models.evaluate import evaluate
        m, _ = load_model(out)
        test = evaluate(m, ds, split="test", protocols=("full",))["full"]
        lines += [f"## Budgeted training ({args.train_minutes:g} min wall clock)", "",
                  f"Epochs run: {len(res.history)}, best epoch by validation NDCG@10: {res.best_epoch}, "
                  f"{res.seconds / 60:.1f} min including per-epoch validation.", "",
                  "| split | NDCG@10 | HR@10 | NDCG@20 | HR@20 | MRR |", "|---|---|---|---|---|---|",
                  "| valid (full) | " + " | ".join(f"{res.valid[k]:.4f}" for k in
                                                   ("ndcg@10", "hr@10", "ndcg@20", "hr@20", "mrr")) + " |",
                  "| test (full) | " + " | ".join(f"{test[k]:.4f}" for k in
                                                  ("ndcg@10", "hr@10", "ndcg@20", "hr@20", "mrr")) + " |", "",
                  "Validation NDCG@10 per epoch: "
                  + ", ".join(f"{h['valid_ndcg@10']:.4f}" for h in res.history), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
