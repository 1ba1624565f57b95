"""Fisher estimation speed on ml-1m (thesis fig. 4.4): sequences/s of every item selection with the
per-example and batchwise computations, beside a plain per-sequence Python loop (one forward per
sequence, one autograd backward per (sequence, item)), all on the same users in the same run.

    nice -n 5 .venv/bin/python bench/fisher_speed.py --source ../shared/data/ml-1m \
        --out docs/results/fisher_speed.md
    .venv/bin/python bench/fisher_speed.py --device cuda --out fisher_speed-cuda.md   # on a GPU machine

Runs that would take many minutes — batchwise `exact` (one backward of the batch per item: 3,706 per
batch) and the loop's `exact` (3,706 backwards per sequence) — are timed on their first part and
extrapolated: each is a chain of identical steps. Batchwise is timed batch by batch (the same batches
compute_fisher forms), so short and long batches both count; the loop on the first items of every
sequence. The table marks these rates.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import machine  # noqa: E402
from merging.fisher_compute import compute_fisher  # noqa: E402
from merging.item_selection import select_items  # noqa: E402
from models.backbone import SeqRecModel  # noqa: E402
from models.batching import length_batches, pad_left  # noqa: E402
from models.config import BackboneConfig  # noqa: E402
from models.data import PreparedDataset, prepare_dataset  # noqa: E402


class _Enough(Exception):
    """Raised from a progress callback to end a timed run early."""


def _now(device: torch.device) -> float:
    """perf_counter once the device has finished what was queued: CUDA kernels run asynchronously."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def library_rate(model, seqs, targets, sampling, n, computation, batch_size, partial=None) -> float:
    """Sequences/s of compute_fisher. With `partial`, each batch runs on its own until that share of
    its ranks is done, and its full time is extrapolated from there."""
    dev = model.item_emb.weight.device
    if partial is None:
        t0 = _now(dev)
        compute_fisher(model, seqs, targets, sampling=sampling, n=n, computation=computation,
                       batch_size=batch_size)
        return len(seqs) / (_now(dev) - t0)

    def stop(stage, fraction):
        if fraction >= partial:
            raise _Enough

    seconds = 0.0
    for idx in length_batches([len(s) for s in seqs], batch_size):
        t0 = _now(dev)
        try:
            compute_fisher(model, [seqs[i] for i in idx], [targets[i] for i in idx], sampling=sampling, n=n,
                           computation=computation, batch_size=batch_size, progress=stop)
            share = 1.0
        except _Enough:
            share = partial
        seconds += (_now(dev) - t0) / share
    return len(seqs) / seconds


def loop_rate(model, seqs, targets, sampling, n, max_items=None) -> float:
    """The plain loop: per sequence one forward, then per selected item one autograd backward, squared
    and added with its weight. With max_items, each sequence stops after that many items and the rate
    is extrapolated to all of them."""
    params = [p for p in model.parameters()]
    dev = params[0].device
    fisher = [torch.zeros_like(p) for p in params]
    model.eval()
    t0 = _now(dev)
    done = 0.0
    for i, (seq, target) in enumerate(zip(seqs, targets)):
        log_p = torch.log_softmax(model.next_item_scores(pad_left([seq]).to(dev)), dim=-1)[0]
        cols, w = select_items(log_p.detach().exp()[None], sampling, n, torch.tensor([target]), [i])
        items = list(zip(cols[0].tolist(), w[0].tolist()))
        todo = items[:max_items] if max_items else items
        for c, weight in todo:
            for f, g in zip(fisher, torch.autograd.grad(log_p[c], params, retain_graph=True)):
                f.add_(g.square(), alpha=weight)
        done += len(todo) / len(items)
    return done / (_now(dev) - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--source", default="../shared/data/ml-1m")
    ap.add_argument("--data", help="an already prepared dataset directory (skips prepare)")
    ap.add_argument("--users", type=int, default=64, help="seeded random users, timed by every method")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--ns", type=int, nargs="+", default=[10, 30, 50])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--partial", type=float, default=0.03,
                    help="share of each batch's ranks timed by batchwise exact before extrapolating")
    ap.add_argument("--partial-items", type=int, default=100, help="items per sequence timed by the exact loop")
    ap.add_argument("--max-len", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads; on a loaded shared CPU a second thread mostly waits at barriers")
    ap.add_argument("--device", default="cpu", help="where every method runs: cpu, cuda, cuda:1, ...")
    ap.add_argument("--out", help="write a Markdown report here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: this torch build or machine has no CUDA device")

    load_before = os.getloadavg()
    ds = PreparedDataset.load(args.data) if args.data else \
        prepare_dataset(args.source, Path(tempfile.mkdtemp(prefix="recmerge-bench-")) / "data")
    train = ds.train_sequences()
    rng = np.random.default_rng(args.seed)
    users = np.sort(rng.choice(np.flatnonzero([len(s) >= 2 for s in train]), size=args.users, replace=False))
    seqs = [train[u][:-1] for u in users]
    lengths = np.array([min(len(q), args.max_len - 1) + 1 for q in seqs])  # tokens with [MASK]
    targets = [int(train[u][-1]) for u in users]
    torch.manual_seed(args.seed)
    cfg = BackboneConfig(n_items=ds.n_items, kind="bert4rec", hidden=64, layers=2, heads=2, inner=256,
                         max_len=args.max_len)
    model = SeqRecModel(cfg).to(device).eval()  # random init: speed does not depend on the weights

    selections = [("exact", None)] + [(s, n) for n in args.ns for s in ("random", "topk", "model")] + \
        [("target", None)]
    rates: dict[tuple, dict[str, list[float]]] = {sel: {} for sel in selections}
    library_rate(model, seqs[:4], targets[:4], "topk", 2, "per-example", 4)  # warm-up
    t_start = time.perf_counter()
    for rep in range(args.repeats):
        for sel in selections:
            sampling, n = sel
            exact = sampling == "exact"
            # Alternate the three so that machine noise hits them alike.
            r = rates[sel]
            r.setdefault("per-example", []).append(
                library_rate(model, seqs, targets, sampling, n, "per-example", args.batch_size))
            r.setdefault("batchwise", []).append(
                library_rate(model, seqs, targets, sampling, n, "batchwise", args.batch_size,
                             partial=args.partial if exact else None))
            r.setdefault("loop", []).append(
                loop_rate(model, seqs, targets, sampling, n, args.partial_items if exact else None))
            print(f"repeat {rep + 1}: {sampling:<6} n={n}: " + ", ".join(
                f"{k} {v[-1]:.3f}" for k, v in r.items()) + " seq/s", flush=True)
    minutes = (time.perf_counter() - t_start) / 60
    load_after = os.getloadavg()
    gpu = f"; every method on {torch.cuda.get_device_name(device)} ({args.device})" if device.type == "cuda" else ""

    med = {sel: {k: statistics.median(v) for k, v in r.items()} for sel, r in rates.items()}
    lines = [
        "# Fisher estimation speed (thesis fig. 4.4)", "",
        f"Command: `nice -n 5 {' '.join(['.venv/bin/python'] + sys.argv)}`", "",
        f"Machine: {machine.line()}{gpu}. The CPU is shared with other engineers' jobs: load average "
        f"{load_before[0]:.1f} before and {load_after[0]:.1f} after the {minutes:.1f}-minute run, so absolute "
        "rates are low and noisy; the ratios compare methods measured alternately in the same run.", "",
        f"Model: bert4rec backbone, hidden 64, 2 layers, 2 heads, inner 256, max_len {args.max_len}, random "
        f"init, float32, eval mode. Data: ml-1m ({ds.n_users} users, {ds.n_items} items); {args.users} seeded "
        f"random users, histories of {lengths.min()}–{lengths.max()} tokens (mean {lengths.mean():.0f}) after "
        f"the {args.max_len}-token window, batches of {args.batch_size}; every method runs on the same users.", "",
        f"Rates are sequences/s, median of {args.repeats} repeats. "
        f"* = timed on the first {args.partial:.0%} of each batch's ranks (batchwise) or the first "
        f"{args.partial_items} items of each sequence (loop) and extrapolated.", "",
        "| selection | n | items/seq | per-example | batchwise | plain loop | per-example / batchwise "
        "| per-example / loop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (sampling, n), m in med.items():
        k = {"exact": ds.n_items, "target": 1}.get(sampling, n)
        star = "*" if sampling == "exact" else ""
        lines.append(f"| {sampling} | {n or '–'} | {k} | {m['per-example']:.3g} | {m['batchwise']:.3g}{star} | "
                     f"{m['loop']:.3g}{star} | {m['per-example'] / m['batchwise']:.2f}× | "
                     f"{m['per-example'] / m['loop']:.1f}× |")
    pe_bw = [m["per-example"] / m["batchwise"] for m in med.values()]
    pe_loop = [m["per-example"] / m["loop"] for m in med.values()]
    lines += ["", f"Per-example / batchwise: min {min(pe_bw):.2f}×, median {statistics.median(pe_bw):.2f}×. "
              f"Per-example / plain loop: min {min(pe_loop):.1f}×, median {statistics.median(pe_loop):.1f}×.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
