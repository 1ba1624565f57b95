"""The thesis's merge tables (4.3, 4.4, 4.6) in the fine-tune setting: every recipe model, uniform soup,
greedy soup, Fisher merges with each item selection and n, each with and without one epoch of cloze
fine-tuning after the merge, and the Fisher merge without the weakest recipe.

The ingredients come from bench/recipes.py (its --work directory: data-<dataset>/, base.safetensors and
one <recipe>.safetensors per recipe trained from the base), so both benchmarks describe the same models:

    nice -n 5 .venv/bin/python bench/recipes.py --dataset ml-100k --work runs/ml-100k ...
    nice -n 5 .venv/bin/python bench/merge_quality.py --work runs/ml-100k --dataset ml-100k \
        --out docs/results/merge_quality.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import machine  # noqa: E402
from merging.fisher import estimate_fisher  # noqa: E402
from merging.merge import merge_checkpoints  # noqa: E402
from models.backbone import SeqRecModel  # noqa: E402
from models.checkpoint import load_model, read_metadata  # noqa: E402
from models.data import PreparedDataset  # noqa: E402
from models.evaluate import evaluate  # noqa: E402
from models.recipes import RECIPES  # noqa: E402
from models.train import TrainConfig, train  # noqa: E402

PROTOCOLS = ("full", "random100", "popular100")
COLUMNS = [("valid", "full", "ndcg@10")] + [("test", p, m) for p in PROTOCOLS for m in ("ndcg@10", "ndcg@20")]


def scores(path: Path, ds) -> dict:
    model, _ = load_model(path)
    return {split: evaluate(model, ds, split=split, protocols=PROTOCOLS) for split in ("valid", "test")}


def valid_ndcg_of_state(ds, cfg):
    def score(state: dict[str, torch.Tensor]) -> float:
        model = SeqRecModel(cfg)
        model.load_state_dict(state)
        return evaluate(model.eval(), ds, split="valid", protocols=("full",))["full"]["ndcg@10"]
    return score


def finetune(path: Path, ds, epochs: int, seed: int) -> Path:
    b = read_metadata(path).backbone
    out = path.with_name(path.name.removesuffix(".safetensors") + "+ft.safetensors")
    cfg = TrainConfig.continuing(b, str(path), recipe="bert4rec", epochs=epochs, patience=0, seed=seed)
    train(ds, cfg, out)
    return out


def row_text(name: str, r: dict) -> str:
    return f"| {name} | " + " | ".join(f"{r[s][p][m]:.4f}" for s, p, m in COLUMNS) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", required=True, help="bench/recipes.py's work directory")
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="ingredients, comma-separated")
    ap.add_argument("--selections", default="topk,random,model,target", help="Fisher item selections")
    ap.add_argument("--ns", default="10,30,50", help="n for random/topk/model")
    ap.add_argument("--computation", default="per-example", choices=["per-example", "batchwise"])
    ap.add_argument("--fisher-users", type=int, help="estimate Fishers on a seeded subset of users")
    ap.add_argument("--finetune-epochs", type=int, default=1)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="Markdown report")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    ds = PreparedDataset.load(work / f"data-{args.dataset}")
    names = [n for n in args.recipes.split(",") if n]
    paths = {n: work / f"{n}.safetensors" for n in names}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        sys.exit(f"missing ingredients (run bench/recipes.py first): {', '.join(missing)}")
    machine_line = machine.line()
    out_dir = work / "merges"
    out_dir.mkdir(exist_ok=True)
    t_all = time.perf_counter()
    results: dict[str, dict] = {}
    timings: dict[str, float] = {}

    def record(name: str, path: Path, ft: bool = True) -> None:
        results[name] = scores(path, ds)
        print(row_text(name, results[name]), flush=True)
        if ft and args.finetune_epochs:
            results[name + " +ft"] = scores(finetune(path, ds, args.finetune_epochs, args.seed), ds)
            print(row_text(name + " +ft", results[name + " +ft"]), flush=True)

    base = work / "base.safetensors"
    if base.exists():
        record("base (bert4rec)", base, ft=False)
    for n, p in paths.items():
        record(n, p, ft=False)
    ckpts = [str(paths[n]) for n in names]

    merge_checkpoints("uniform", ckpts, out_dir / "uniform.safetensors")
    record("uniform", out_dir / "uniform.safetensors")
    cfg = read_metadata(ckpts[0]).backbone
    gs = merge_checkpoints("greedy-soup", ckpts, out_dir / "greedy.safetensors", score=valid_ndcg_of_state(ds, cfg))
    record("greedy-soup", out_dir / "greedy.safetensors")
    kept = json.loads(gs.metadata["merge"]).get("selection", {}).get("kept", [])
    kept_names = [names[i] for i in kept]

    settings = []
    for sel in args.selections.split(","):
        if sel in ("random", "topk", "model"):
            settings += [{"sampling": sel, "n": int(n)} for n in args.ns.split(",")]
        else:
            settings.append({"sampling": sel})
    best_fisher = (-1.0, None)
    for s in settings:
        s = {**s, "computation": args.computation, "seed": args.seed, "max_users": args.fisher_users}
        label = f"fisher {s['sampling']}" + (f" n={s['n']}" if "n" in s else "")
        t0 = time.perf_counter()
        fishers = [estimate_fisher(c, ds, s, cache_dir=work / "fisher-cache").path for c in ckpts]
        timings[label + " (Fishers)"] = time.perf_counter() - t0
        out = out_dir / (label.replace(" ", "_").replace("=", "") + ".safetensors")
        merge_checkpoints("fisher", ckpts, out, fishers=[str(f) for f in fishers])
        record(label, out)
        if results[label]["valid"]["full"]["ndcg@10"] > best_fisher[0]:
            best_fisher = (results[label]["valid"]["full"]["ndcg@10"], (s, fishers))

    # Table 4.6: drop the recipe with the lowest validation NDCG@10 and merge the rest with the best setting.
    weakest = min(names, key=lambda n: results[n]["valid"]["full"]["ndcg@10"])
    s, fishers = best_fisher[1]
    keep = [i for i, n in enumerate(names) if n != weakest]
    out = out_dir / "fisher_without_weakest.safetensors"
    merge_checkpoints("fisher", [ckpts[i] for i in keep], out, fishers=[str(fishers[i]) for i in keep])
    record(f"fisher best setting without {weakest}", out)

    ingredients = list(names)
    best_ing = max(ingredients, key=lambda n: results[n]["valid"]["full"]["ndcg@10"])
    merged = [k for k in results if k not in ingredients and not k.startswith("base")]
    best_merge = max(merged, key=lambda k: results[k]["valid"]["full"]["ndcg@10"])
    lines = [
        f"# Merge quality on {args.dataset} (fine-tune setting)", "",
        f"Command: `{' '.join(['.venv/bin/python'] + sys.argv)}`", "",
        f"Machine: {machine_line}; load average at the end {' '.join(machine.loadavg())}; "
        f"total {(time.perf_counter() - t_all) / 60:.1f} min.", "",
        f"Dataset: {ds.n_users} users, {ds.n_items} items. Ingredients: {', '.join(names)} (each trained from the "
        f"bert4rec base by bench/recipes.py). Fishers: {args.computation}, "
        f"{'all users' if not args.fisher_users else f'{args.fisher_users} users'}; `+ft` = one more epoch of "
        f"cloze training after the merge.", "",
        "| model | valid full NDCG@10 | " + " | ".join(f"test {p} {m.upper()}" for _, p, m in COLUMNS[1:]) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    lines += [row_text(k, r) for k, r in results.items()]
    bi, bm = results[best_ing], results[best_merge]
    lines += ["", f"Best ingredient by validation: **{best_ing}** (valid {bi['valid']['full']['ndcg@10']:.4f}, "
              f"test {bi['test']['full']['ndcg@10']:.4f}). Best merge by validation: **{best_merge}** "
              f"(valid {bm['valid']['full']['ndcg@10']:.4f}, test {bm['test']['full']['ndcg@10']:.4f}).", "",
              f"Greedy soup kept: {', '.join(kept_names)}.", "",
              "Fisher estimation time (all ingredients): "
              + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()), ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps({"results": results, "timings": timings},
                                                                  indent=1))


if __name__ == "__main__":
    main()
