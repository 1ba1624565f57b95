"""The default Fisher merge at the size where exact Fishers take an hour: four ~1 MB models on ~30,000
synthetic users. Goal: `recmerge merge --method fisher` with no Fisher settings finishes within 5 minutes.

    python -m bench.fisher_defaults --probe      # seq/s of candidate settings on 512 users of one model
    python -m bench.fisher_defaults              # the CLI's default fisher merge of four models, timed

Writes docs/results/fisher_defaults.md (the probe adds its table to the run's JSON beside it). The models
are freshly initialised, not trained: estimation cost does not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
USERS, ITEMS, MAX_LEN = 30_000, 2_000, 50
CANDIDATES = [{"sampling": "exact"}, {"sampling": "topk", "n": 10}, {"sampling": "topk", "n": 30},
              {"sampling": "model", "n": 10}, {"sampling": "target"}]


def make_dataset(work: Path):
    """30,000 users with 5-120 interactions (log-uniform, mean ~35) over 2,000 items with a Zipf-like
    popularity, written as a CSV and prepared the way `recmerge data prepare` does."""
    from models.data import PreparedDataset, prepare_dataset

    out = work / "data"
    if (out / "meta.json").is_file():
        return PreparedDataset.load(out)
    rng = np.random.default_rng(0)
    lengths = np.exp(rng.uniform(np.log(5), np.log(120), USERS)).astype(int)
    pop = 1.0 / np.arange(1, ITEMS + 1) ** 0.8
    items = rng.choice(ITEMS, size=int(lengths.sum()), p=pop / pop.sum()) + 1
    users = np.repeat(np.arange(USERS), lengths)
    order = np.concatenate([np.arange(n) for n in lengths])
    csv = work / "interactions.csv"
    with open(csv, "w") as f:
        f.write("user,item,ts\n")
        for u, i, t in zip(users.tolist(), items.tolist(), order.tolist()):
            f.write(f"{u},{i},{t}\n")
    return prepare_dataset(csv, out, min_user=5)


def make_models(work: Path, ds, count: int = 4) -> list[Path]:
    import torch

    from models.backbone import SeqRecModel
    from models.checkpoint import CheckpointMeta, save_checkpoint
    from models.config import BackboneConfig

    cfg = BackboneConfig(n_items=ds.n_items, hidden=64, layers=2, heads=2, inner=256, max_len=MAX_LEN)
    paths = []
    for seed in range(count):
        path = work / f"model{seed}.safetensors"
        if not path.is_file():
            torch.manual_seed(seed)
            state = SeqRecModel(cfg).state_dict()
            meta = CheckpointMeta(backbone=cfg, recipe={"name": "bert4rec"}, dataset_fingerprint=ds.fingerprint,
                                  n_items=ds.n_items)
            save_checkpoint(path, state, meta)
        paths.append(path)
    return paths


def probe(ds, model: Path, users: int = 512) -> list[dict]:
    from merging.fisher import estimate_fisher

    rows = []
    for cand in CANDIDATES:
        settings = {**cand, "max_users": users}
        t0 = time.perf_counter()
        estimate_fisher(model, ds, settings, out=model.with_name("probe.fisher.safetensors"), device="cpu")
        s = time.perf_counter() - t0
        rows.append({**cand, "users": users, "seconds": round(s, 2), "seq_per_s": round(users / s, 1),
                     "hours_for_all_users_x4": round(4 * ds.n_users / (users / s) / 3600, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def run_cli(ds, models: list[Path], work: Path) -> dict:
    out = work / "merged.safetensors"
    for p in work.glob("merged*"):
        p.unlink()
    cmd = [sys.executable, "-m", "app.cli", "merge", "--method", "fisher", *map(str, models),
           "--data", str(ds.path), "--out", str(out)]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"merge failed ({done.returncode}): {done.stderr[-2000:]}")
    return {"command": " ".join(["recmerge", *cmd[3:]]).replace(str(work), "$WORK"), "seconds": round(seconds, 1),
            "stdout": done.stdout.replace(str(work), "$WORK")}


def main(argv=None) -> int:
    from bench.machine import describe

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/recmerge-fisher-defaults")
    ap.add_argument("--probe", action="store_true")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ds = make_dataset(work)
    models = make_models(work, ds)
    print(f"dataset {ds.n_users:,} users, {ds.n_items:,} items, {ds.n_interactions:,} interactions; "
          f"models {[round(p.stat().st_size / 1e6, 2) for p in models]} MB; setup {time.perf_counter() - t0:.0f} s",
          flush=True)
    record = {"machine": describe(), "dataset": {"users": ds.n_users, "items": ds.n_items,
                                                 "interactions": ds.n_interactions},
              "model_mb": [round(p.stat().st_size / 1e6, 2) for p in models]}
    if args.probe:
        record["probe"] = probe(ds, models[0])
        (RESULTS / "fisher_defaults_probe.json").write_text(json.dumps(record, indent=2) + "\n")
        return 0
    record["run"] = run_cli(ds, models, work)
    print(record["run"]["stdout"])
    print(f"{record['run']['seconds']} s (goal: 300 s)")
    (RESULTS / "fisher_defaults.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
