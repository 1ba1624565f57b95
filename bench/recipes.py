"""The thesis's fine-tune setting on MovieLens: train a bert4rec base, then every recipe from the base;
test NDCG@10/20 under full, random100 and popular100, and each recipe's cost per epoch against bert4rec's.

    nice -n 5 .venv/bin/python bench/recipes.py --dataset ml-100k --base-epochs 60 --epochs 5 --threads 1 \
        --json docs/results/recipes.json

Two timings per recipe: `s/epoch` is the mean training time of its epochs in the fine-tune run (what the
trainer logs), and `ratio` compares the same batches run through every recipe in interleaved rounds
(median of rounds; process CPU time with one torch thread, else wall clock), which is what to trust on a
shared machine whose load changes between runs. `--timing-only` does just that comparison, on a fresh
model, e.g. for ml-1m when a full run does not fit:

    nice -n 5 .venv/bin/python bench/recipes.py --dataset ml-1m --timing-only --timing-batches 12 --threads 1
Training goes through `models.train.train`, the function `recmerge train` calls.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.backbone import SeqRecModel  # noqa: E402
from models.batching import length_batches  # noqa: E402
from models.checkpoint import load_model  # noqa: E402
from models.data import prepare_dataset  # noqa: E402
from models.evaluate import evaluate  # noqa: E402
from models.recipes import RECIPES, TrainBatch, recipe_class, recipe_options  # noqa: E402
from models.train import TrainConfig, backbone_config, build_samples, train  # noqa: E402

SOURCES = {"ml-100k": "ml-100k", "ml-1m": "ml-1m"}
PROTOCOLS = ("full", "random100", "popular100")


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown")
    return {"cpu": cpu, "nproc": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "loadavg_start": open("/proc/loadavg").read().split()[:3]}


def interleaved_step_seconds(base, ds, names: list[str], max_len: int, batch_size: int, n_batches: int,
                             rounds: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Seconds per batch of forward + backward + AdamW step for each recipe on the very same batches,
    median over rounds, wall clock and process CPU time; recipes take turns within each round so load
    changes on a shared machine hit them alike (with one torch thread, CPU time ignores that load)."""
    samples = build_samples(ds.train_sequences(), max_len, base.causal)
    lengths = np.array([len(s) for s in samples])
    batches = length_batches(lengths, batch_size, np.random.default_rng(seed))
    if n_batches:
        batches = batches[:n_batches]
    runs = {}
    for name in names:
        model = copy.deepcopy(base).train()
        recipe = recipe_class(name)(recipe_options(name), model)
        recipe.setup(samples)
        opt = torch.optim.AdamW(list(model.parameters()) + recipe.parameters(), lr=1e-3)
        runs[name] = (model, recipe, opt)
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(rounds):
        for name in names:
            model, recipe, opt = runs[name]
            rng = np.random.default_rng(seed + r)
            t0, c0 = time.perf_counter(), time.process_time()
            for idx in batches:
                loss, _ = recipe.loss(model, TrainBatch([samples[i] for i in idx], idx, rng))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            recipe.end_epoch()
            times[name]["wall"].append((time.perf_counter() - t0) / len(batches))
            times[name]["cpu"].append((time.process_time() - c0) / len(batches))
    return {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}


def test_metrics(path: Path, ds) -> dict:
    model, _ = load_model(path)
    return evaluate(model, ds, split="test", protocols=PROTOCOLS)


def fmt_table(rows: list[dict]) -> str:
    head = ("| model | full N@10 | full N@20 | rand100 N@10 | rand100 N@20 | pop100 N@10 | pop100 N@20 "
            "| s/epoch | ratio (interleaved) |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        m = r["test"]
        cells = [f"{m[p][f'ndcg@{k}']:.4f}" for p in PROTOCOLS for k in (10, 20)]
        spe = f"{r['seconds_per_epoch']:.1f}" if r.get("seconds_per_epoch") else "–"
        ratio = f"{r['step_ratio']:.2f}×" if r.get("step_ratio") else "–"
        lines.append(f"| {r['name']} | " + " | ".join(cells) + f" | {spe} | {ratio} |")
    return "\n".join(lines)


def fmt_timing(step: dict[str, dict[str, float]]) -> str:
    ref = step["bert4rec"]
    lines = ["| recipe | wall s/batch | ratio | CPU s/batch | ratio |", "|---|---|---|---|---|"]
    for name, t in step.items():
        lines.append(f"| {name} | {t['wall']:.3f} | {t['wall'] / ref['wall']:.2f}× | {t['cpu']:.3f} | "
                     f"{t['cpu'] / ref['cpu']:.2f}× |")
    over = [n for n, t in step.items() if min(t["wall"] / ref["wall"], t["cpu"] / ref["cpu"]) > 2.5]
    lines.append("\nover the 2.5× budget: " + (", ".join(over) if over else "none"))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", choices=list(SOURCES), default="ml-100k")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--work", help="directory for the prepared data and checkpoints (default: a temp dir)")
    ap.add_argument("--base", help="reuse this base checkpoint instead of training one")
    ap.add_argument("--base-epochs", type=int, default=60)
    ap.add_argument("--base-patience", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=5, help="fine-tune epochs of each recipe from the base")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated; bert4rec is the reference")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--max-len", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--timing-batches", type=int, default=0, help="batches per interleaved round (0 = an epoch)")
    ap.add_argument("--timing-rounds", type=int, default=3)
    ap.add_argument("--timing-only", action="store_true",
                    help="only the interleaved timing, on a freshly initialised model (no training)")
    ap.add_argument("--json", help="write every number here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    if "bert4rec" not in names:
        names.insert(0, "bert4rec")
    for n in names:
        recipe_class(n)  # fail on an unknown name before any work

    work = Path(args.work or tempfile.mkdtemp(prefix="recmerge-recipes-"))
    work.mkdir(parents=True, exist_ok=True)
    ds = prepare_dataset(Path(args.data_root) / SOURCES[args.dataset], work / f"data-{args.dataset}")
    print(f"{args.dataset}: {ds.n_users} users, {ds.n_items} items; work dir {work}", flush=True)
    common = dict(hidden=args.hidden, layers=args.layers, max_len=args.max_len, batch_size=args.batch_size,
                  lr=args.lr)
    report = {"args": vars(args), "machine": machine(), "dataset": {"name": args.dataset, "users": ds.n_users,
                                                                      "items": ds.n_items}, "rows": []}
    t_all = time.perf_counter()
    if args.timing_only:
        torch.manual_seed(0)
        model = SeqRecModel(backbone_config(TrainConfig(**common), ds.n_items))
        step = interleaved_step_seconds(model, ds, names, args.max_len, args.batch_size, args.timing_batches,
                                        args.timing_rounds)
        report["step_seconds"] = step
        print(fmt_timing(step))
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
        return

    if args.base:
        base_path = Path(args.base)
        report["base"] = {"checkpoint": str(base_path)}
    else:
        base_path = work / "base.safetensors"
        t0 = time.perf_counter()
        res = train(ds, TrainConfig(recipe="bert4rec", epochs=args.base_epochs, patience=args.base_patience,
                                    **common), base_path, show_bar=True)
        report["base"] = {"checkpoint": str(base_path), "best_epoch": res.best_epoch,
                          "epochs_run": len(res.history), "seconds": round(time.perf_counter() - t0, 1),
                          "seconds_per_epoch": float(np.mean([h["train_seconds"] for h in res.history]))}
    report["rows"].append({"name": "base (bert4rec)", "test": test_metrics(base_path, ds),
                           "seconds_per_epoch": report["base"].get("seconds_per_epoch")})

    for name in names:
        out = work / f"{name}.safetensors"
        res = train(ds, TrainConfig(recipe=name, epochs=args.epochs, patience=0, init=str(base_path), **common),
                    out, show_bar=True)
        row = {"name": f"{name} (from base)", "recipe": name, "best_epoch": res.best_epoch,
               "valid_ndcg@10": res.valid["ndcg@10"], "test": test_metrics(out, ds),
               "seconds_per_epoch": float(np.mean([h["train_seconds"] for h in res.history])),
               "log": str(res.log_path)}
        report["rows"].append(row)
        print(f"{name}: test full ndcg@10 {row['test']['full']['ndcg@10']:.4f}, "
              f"{row['seconds_per_epoch']:.1f} s/epoch", flush=True)

    step = interleaved_step_seconds(load_model(base_path)[0], ds, names, args.max_len, args.batch_size,
                                    args.timing_batches, args.timing_rounds)
    report["step_seconds"] = step
    clock = "cpu" if torch.get_num_threads() == 1 else "wall"
    for row in report["rows"]:
        if row.get("recipe") in step:
            row["step_ratio"] = step[row["recipe"]][clock] / step["bert4rec"][clock]
            row["epoch_ratio"] = row["seconds_per_epoch"] / next(
                r["seconds_per_epoch"] for r in report["rows"] if r.get("recipe") == "bert4rec")
    report["seconds_total"] = round(time.perf_counter() - t_all, 1)
    report["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]

    print()
    print(fmt_table(report["rows"]))
    print()
    print(fmt_timing(step))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
