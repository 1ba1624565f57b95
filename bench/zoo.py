"""The model zoo: converged checkpoints kept in the repository (zoo/<dataset>/*.safetensors) with one
manifest (zoo/manifest.json) saying what each is, how it was made and what it scores.

    # evaluate a trained checkpoint and add it (copied in, metrics with standard errors over users)
    .venv/bin/python bench/zoo.py add runs/sasrec.safetensors --dataset ml-1m --name sasrec-base \
        --command "recmerge train ..." [--minutes 60.2]
    # the accuracy table (thesis layout) for every zoo model of a dataset
    .venv/bin/python bench/zoo.py report --dataset ml-1m --out docs/results/accuracy-ml-1m.md

Metrics: leave-one-out, the user's history excluded; Full ranks every item, Random100 / Popular100 the
target among 100 sampled negatives (uniform / by popularity; models/evaluate.py). The manifest's figures
are re-checked by tests/models/test_zoo.py against `recmerge evaluate` on ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import machine  # noqa: E402
from models.checkpoint import file_sha256, load_model, read_metadata  # noqa: E402
from models.data import PreparedDataset, prepare_dataset  # noqa: E402
from models.evaluate import eval_data, user_ranks  # noqa: E402
from models.metrics import mean_se, per_user_metrics  # noqa: E402

ZOO = ROOT / "zoo"
MANIFEST = ZOO / "manifest.json"
SOURCES = {"ml-1m": ROOT.parent / "shared" / "data" / "ml-1m", "ml-100k": ROOT.parent / "shared" / "data" / "ml-100k"}
REPORT_PROTOCOLS = ("full", "random100", "popular100")


def prepared(args, into: Path):
    """The dataset of a command: its --data directory if given, else ../shared/data/<dataset> prepared into
    `into`/data-<dataset> (or loaded from there, where an earlier run prepared it). Refuses a dataset name
    outside SOURCES without --data before anything is written."""
    if getattr(args, "data", None):
        return PreparedDataset.load(args.data)
    if args.dataset not in SOURCES:
        sys.exit(f"dataset {args.dataset!r} is none of {', '.join(sorted(SOURCES))}: give its prepared --data")
    out = into / f"data-{args.dataset}"
    return PreparedDataset.load(out) if out.exists() else prepare_dataset(str(SOURCES[args.dataset]), out)


def scores(path: Path, ds, split: str) -> dict:
    """{protocol: {metric: [mean, standard error over users]}}"""
    model, _ = load_model(path)
    ranks = user_ranks(model, eval_data(ds, split), REPORT_PROTOCOLS)
    out = {}
    for protocol, r in ranks.items():
        per_user = per_user_metrics(r)
        out[protocol] = {k: list(mean_se(v)) for k, v in per_user.items()}
    return out


def load_manifest() -> dict:
    return json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {"models": []}


def add(args) -> None:
    src = Path(args.checkpoint)
    meta = read_metadata(src)
    with tempfile.TemporaryDirectory() as tmp:
        ds = prepared(args, Path(tmp))
        if meta.dataset_fingerprint != ds.fingerprint:
            sys.exit(f"{src} was not trained on {args.dataset} as prepared from "
                     f"{args.data or SOURCES[args.dataset]}")
        metrics = {split: scores(src, ds, split) for split in ("valid", "test")}
    dest_dir = ZOO / args.dataset
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{args.name}.safetensors"
    shutil.copyfile(src, dest)
    log = src.with_name(src.name.removesuffix(".safetensors") + ".log.json")
    train = json.loads(meta.extra.get("train", "{}"))
    history = json.loads(log.read_text())["epochs"] if log.exists() else []
    if history:  # the learning curve, for the results' plots: (minutes, validation NDCG@10) per evaluation
        (dest_dir / f"{args.name}.curve.json").write_text(json.dumps(
            [[round(h["minutes"], 3), round(h["valid_ndcg@10"], 5)] for h in history if "valid_ndcg@10" in h]))
    entry = {
        "name": args.name, "dataset": args.dataset, "file": str(dest.relative_to(ROOT)),
        "sha256": file_sha256(dest), "backbone": json.loads(meta.backbone.to_json()), "recipe": meta.recipe,
        "seed": train.get("config", {}).get("seed"), "epochs": train.get("epochs_run"),
        "best_epoch": train.get("best_epoch"), "init": train.get("config", {}).get("init"),
        "minutes": args.minutes if args.minutes is not None else
        (round(history[-1]["minutes"], 1) if history and "minutes" in history[-1] else None),
        "machine": machine.line(), "command": args.command, "metrics": metrics, "note": args.note,
    }
    if meta.merge:  # a merged model: what made it, beside the figures (the header holds the whole config)
        merge = meta.merge if isinstance(meta.merge, dict) else json.loads(meta.merge)
        search = merge.get("search") or {}
        entry["merge"] = {"method": merge.get("method"), "options": merge.get("options"),
                          "weights": merge.get("weights"), "base_sha256": merge.get("base"),
                          "ingredients_sha256": merge.get("ingredients"),
                          "coefficients": search.get("coefficients") if isinstance(search, dict) else None}
    manifest = load_manifest()
    manifest["models"] = [m for m in manifest["models"] if m["name"] != args.name or m["dataset"] != args.dataset]
    manifest["models"].append(entry)
    MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n")
    full = metrics["test"]["full"]["ndcg@10"]
    print(f"{args.name}: test NDCG@10 {full[0]:.4f} ± {full[1]:.4f} -> {dest.relative_to(ROOT)}")


def per_user_ndcg(path: Path, ds, split: str) -> np.ndarray:
    model, _ = load_model(path)
    return per_user_metrics(user_ranks(model, eval_data(ds, split), ("full",))["full"])["ndcg@10"]


def compare(args) -> None:
    """Full-ranking NDCG@10 of checkpoints on one dataset, each with its paired difference from the first
    (the same users, so the difference's standard error is far smaller than either model's)."""
    with tempfile.TemporaryDirectory() as tmp:
        ds = prepared(args, Path(tmp))
        rows = {split: [per_user_ndcg(Path(c), ds, split) for c in args.checkpoints] for split in ("valid", "test")}
    where = f"--data {args.data}" if args.data else f"--dataset {args.dataset}"
    lines = [f"Command: `.venv/bin/python bench/zoo.py compare {where} " + " ".join(args.checkpoints) + "`", "",
             "| checkpoint | validation NDCG@10 | vs first (paired) | test NDCG@10 | vs first (paired) |",
             "|---|---|---|---|---|"]
    for i, c in enumerate(args.checkpoints):
        cells = []
        for split in ("valid", "test"):
            v, ref = rows[split][i], rows[split][0]
            paired = "—" if i == 0 else "{:+.4f} ± {:.4f}".format(*mean_se(v - ref))
            cells += [fmt(mean_se(v)), paired]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    print("\n".join(lines))


def fmt(pair) -> str:
    return f"{pair[0]:.4f} ± {pair[1]:.4f}"


def report(args) -> None:
    models = [m for m in load_manifest()["models"] if m["dataset"] == args.dataset]
    lines = [f"# Accuracy on {args.dataset}: the model zoo", "",
             f"Command: `.venv/bin/python bench/zoo.py report --dataset {args.dataset} --out {args.out}` "
             "(figures from zoo/manifest.json, each computed by `bench/zoo.py add` and re-checked by "
             "tests/models/test_zoo.py).", "",
             "Leave-one-out, history excluded; ± is one standard error over users. Full: every item ranked; "
             "Random100 / Popular100: the target among 100 negatives sampled uniformly / by popularity.", ""]
    for split in ("test", "valid"):
        lines += [f"## {split}", "",
                  "| model | backbone | recipe | epochs | minutes | " + " | ".join(
                      f"{p} NDCG@10 | {p} NDCG@20 | {p} HR@10" for p in REPORT_PROTOCOLS) + " |",
                  "|---|---|---|---|---|" + "---|" * (3 * len(REPORT_PROTOCOLS))]
        for m in models:
            cells = []
            for p in REPORT_PROTOCOLS:
                mm = m["metrics"][split][p]
                cells += [fmt(mm["ndcg@10"]), fmt(mm["ndcg@20"]), fmt(mm["hr@10"])]
            lines.append(f"| {m['name']} | {m['backbone']['kind']} | {m['recipe']['name']} | {m['epochs']} | "
                         f"{m['minutes']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## How each was made", ""]
    for m in models:
        note = f" — {m['note']}" if m.get("note") else ""
        lines.append(f"- **{m['name']}** ({m['machine']}): `{m['command']}`{note}")
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("add")
    a.add_argument("checkpoint")
    a.add_argument("--dataset", required=True, help=f"{', '.join(sorted(SOURCES))}, or any name with --data")
    a.add_argument("--data", help="its prepared directory, for a dataset not under ../shared/data (the zoo test "
                   "skips such entries' figures where ../shared/data/<dataset> is absent)")
    a.add_argument("--name", required=True)
    a.add_argument("--command", required=True, help="the exact command that trained it")
    a.add_argument("--minutes", type=float, help="training minutes (default: from the log beside it)")
    a.add_argument("--note", default="")
    a.set_defaults(func=add)
    c = sub.add_parser("compare", help="paired NDCG@10 differences of checkpoints from the first")
    c.add_argument("checkpoints", nargs="+")
    where = c.add_mutually_exclusive_group(required=True)
    where.add_argument("--dataset", choices=sorted(SOURCES))
    where.add_argument("--data", help="a prepared dataset directory instead (one not in the zoo's list)")
    c.set_defaults(func=compare)
    r = sub.add_parser("report")
    r.add_argument("--dataset", required=True, help="a dataset name of the manifest")
    r.add_argument("--out")
    r.set_defaults(func=report)
    args = ap.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
