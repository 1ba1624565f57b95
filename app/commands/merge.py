"""`recmerge merge --method METHOD CKPT... --out M.safetensors`: merge checkpoints with any registered
method (uniform, weighted, fisher, greedy-soup, task-arithmetic, ties, dare), streamed tensor by tensor;
optionally fine-tune the merge and print its metrics beside each ingredient's."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge checkpoints (uniform, weighted, fisher, greedy-soup, task-arithmetic, "
                                     "ties, dare)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="ingredient checkpoints (.safetensors)")
    p.add_argument("--method", required=True, help="merge method; an unknown name lists the known ones")
    p.add_argument("--out", required=True, help="merged checkpoint to write (.safetensors)")
    p.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per checkpoint (w_i or λ_i)")
    p.add_argument("--fisher", nargs="+", metavar="F",
                   help="one Fisher file per checkpoint (fisher method; estimated from --data when omitted)")
    p.add_argument("--base", help="base checkpoint for task-vector methods (task-arithmetic, ties, dare)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable: normalize=true, epsilon=1e-8, alpha=0.5, density=0.2, "
                        "p=0.9, seed=1, combine=ties")
    p.add_argument("--fisher-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="Fisher estimation setting when --fisher is omitted, repeatable (default sampling=topk, "
                        "n=10, max_users=4000, chosen to finish in minutes on ~30,000 users; e.g. sampling=exact, "
                        "n=30, computation=batchwise, max_users=all); the files are kept as "
                        "<out>.fisherN.safetensors")
    p.add_argument("--fisher-cache-dir", help="reuse Fishers estimated with the same checkpoint, data and settings")
    p.add_argument("--data", help="prepared dataset: needed by greedy-soup, --evaluate, --finetune-epochs "
                                  "and Fisher estimation")
    p.add_argument("--evaluate", action="store_true",
                   help="print the merged model's validation and test metrics beside each ingredient's")
    p.add_argument("--eval-cache-dir",
                   help="where --evaluate remembers scores by (checkpoint sha256, dataset fingerprint, split, "
                        "protocol) (default $XDG_CACHE_HOME/recmerge/evaluations)")
    p.add_argument("--no-eval-cache", action="store_true", help="score every model again")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="after merging, train this many epochs from the merge (the merge itself is kept as "
                        "<out>.raw.safetensors)")
    p.add_argument("--finetune-recipe", default="bert4rec", help="recipe of the fine-tuning epochs")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... for scoring, Fisher estimation and fine-tuning")
    p.set_defaults(func=run)


def parse_options(items: list[str], flag: str = "--option") -> dict[str, str]:
    """KEY=VALUE strings; values stay strings and the pydantic schema that receives them converts them."""
    from merging.methods import MergeOptionsError

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise MergeOptionsError(f"{flag} {item!r}: expected KEY=VALUE")
        options[key.strip().replace("-", "_")] = value.strip()
    return options


def _load_dataset(args, why: str):
    from models.data import PreparedDataset
    from models.errors import RecmergeError

    if not args.data:
        raise RecmergeError(f"{why} needs --data (the prepared dataset the checkpoints were trained on)")
    return PreparedDataset.load(args.data)


def _check_dataset(ds, checkpoints: list[str]) -> None:
    from models.checkpoint import read_metadata
    from models.errors import IncompatibleError

    for c in checkpoints:
        fp = read_metadata(c).dataset_fingerprint
        if fp != ds.fingerprint:
            raise IncompatibleError(f"{c}: trained on dataset fingerprint {fp[:16]}, but --data has "
                                    f"{ds.fingerprint[:16]}")


def validation_score(ds, backbone, device=None):
    """score(state_dict) = full-ranking validation NDCG@10: what greedy-soup ranks and accepts by."""
    from models.backbone import SeqRecModel
    from models.evaluate import evaluate
    from models.train import resolve_device

    device = resolve_device(device)
    model = SeqRecModel(backbone).to(device).eval()

    def score(state: dict) -> float:
        model.load_state_dict(state)
        return evaluate(model, ds, split="valid", protocols=("full",), device=device)["full"]["ndcg@10"]

    return score


def _estimate_fishers(args, ds) -> list[str]:
    """Fisher files for the fisher method when --fisher is not given, kept beside the output."""
    from app.progress import counting_bar
    from merging.fisher import estimate_fisher, fisher_users, merge_settings, parse_settings

    given = parse_options(args.fisher_setting, "--fisher-setting")
    settings = parse_settings(merge_settings(given))
    users = len(fisher_users(ds, settings))
    eligible = len(fisher_users(ds, settings.model_copy(update={"max_users": None})))
    chosen = ", ".join(f"{k}={v}" for k, v in settings.model_dump().items()
                       if k in ("sampling", "n", "max_users", "computation") and v is not None)
    origin = "defaults, overridden by --fisher-setting" if given else "defaults"
    print(f"fisher: estimating {len(args.checkpoints)} Fishers with {chosen} ({origin}): {users:,} of {eligible:,} "
          f"users" + ("" if users == eligible else f" (a seeded subsample, seed {settings.seed}; "
                                                    "--fisher-setting max_users=all for every user)"), flush=True)
    out, n = Path(args.out), len(args.checkpoints)
    paths = []
    for i, c in enumerate(args.checkpoints):
        f = out.with_name(f"{out.name.removesuffix('.safetensors')}.fisher{i + 1}.safetensors")
        progress, close = counting_bar(users, "seq", f"fisher {i + 1}/{n}")
        try:
            res = estimate_fisher(c, ds, settings, out=f, cache_dir=args.fisher_cache_dir, device=args.device,
                                  progress=progress)
        finally:
            close()
        paths.append(str(res.path))
    return paths


def _finetune(args, ds, merged: Path, out: Path, merge_meta: dict, merged_sha256: str) -> None:
    from models.checkpoint import load_checkpoint, read_metadata, save_checkpoint
    from models.train import TrainConfig, train

    b = read_metadata(merged).backbone
    cfg = TrainConfig(recipe=args.finetune_recipe, backbone=b.kind, hidden=b.hidden, layers=b.layers, heads=b.heads,
                      inner=b.inner, dropout=b.dropout, max_len=b.max_len, epochs=args.finetune_epochs,
                      patience=0, init=str(merged), device=args.device)
    train(ds, cfg, out, show_bar=True)
    # The trainer records how it trained; the fine-tuned model also keeps what it was merged from.
    state, meta = load_checkpoint(out)
    meta.merge = merge_meta | {"finetune": {"recipe": args.finetune_recipe, "epochs": args.finetune_epochs,
                                            "from_sha256": merged_sha256}}
    save_checkpoint(out, state, meta)


def _metrics_table(args, ds, paths: list[tuple[str, str]], known_sha: dict[str, str]) -> str:
    """Validation and test metrics of each model, one row each; scores already computed for the same
    checkpoint bytes, dataset, split and protocol come from the evaluation cache."""
    from models.checkpoint import file_sha256
    from models.eval_cache import EvaluationCache, default_dir
    from models.evaluate import evaluate, load_for_dataset
    from models.train import resolve_device

    device = resolve_device(args.device)
    cache = None if args.no_eval_cache else EvaluationCache(args.eval_cache_dir or default_dir())
    cols = [("valid", "ndcg@10"), ("valid", "hr@10"), ("test", "ndcg@10"), ("test", "hr@10"), ("test", "mrr")]
    width = max(len(label) for label, _ in paths) + 2
    lines = [f"{'model':<{width}}" + "".join(f"{s + ' ' + m:>15}" for s, m in cols)]
    for label, path in paths:
        loaded = []

        def score(split, protocols, path=path, loaded=loaded):
            if not loaded:  # a model whose scores are all cached is never loaded
                loaded.append(load_for_dataset(path, ds, device=device)[0])
            return evaluate(loaded[0], ds, split=split, protocols=protocols, device=device)

        res = {}
        for split in ("valid", "test"):
            if cache is None:
                res[split] = score(split, ("full",))["full"]
            else:
                sha = known_sha.get(path) or file_sha256(path)
                res[split] = cache.evaluate(sha, ds.fingerprint, split, ("full",),
                                            lambda protocols, split=split: score(split, protocols))["full"]
        lines.append(f"{label:<{width}}" + "".join(f"{res[s][m]:>15.4f}" for s, m in cols))
    if cache is not None:
        lines.append(f"({cache.hits} of {cache.hits + cache.misses} evaluations reused from {cache.dir})")
    return "\n".join(lines)


def run(args) -> int:
    from app.progress import progress_bars
    from merging.merge import merge_checkpoints
    from models.errors import RecmergeError

    options = parse_options(args.option)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise RecmergeError(f"{out}: the merged checkpoint must end in .safetensors")
    if args.fisher and args.fisher_setting:
        raise RecmergeError("--fisher-setting applies only when the Fishers are estimated (no --fisher)")
    if args.finetune_epochs < 0:
        raise RecmergeError(f"--finetune-epochs must be >= 0 (got {args.finetune_epochs})")
    needs_data = [why for cond, why in [(args.method == "greedy-soup", "greedy-soup"),
                                        (args.method == "fisher" and not args.fisher, "fisher without --fisher"),
                                        (args.finetune_epochs, "--finetune-epochs"), (args.evaluate, "--evaluate")]
                  if cond]
    ds = None
    if needs_data:
        ds = _load_dataset(args, needs_data[0])
        _check_dataset(ds, args.checkpoints + ([args.base] if args.base else []))

    progress, close = progress_bars()
    try:
        fishers = args.fisher
        if args.method == "fisher" and not fishers:
            from merging.compat import check_compatible
            from merging.merge import build_method

            # Refuse bad options or checkpoints before spending time on Fishers.
            build_method(args.method, len(args.checkpoints), options, args.weights)
            check_compatible(args.checkpoints)
            fishers = _estimate_fishers(args, ds)
        score = None
        if args.method == "greedy-soup":
            from models.checkpoint import read_metadata

            score = validation_score(ds, read_metadata(args.checkpoints[0]).backbone, args.device)
        merged = out.with_name(out.name.removesuffix(".safetensors") + ".raw.safetensors") \
            if args.finetune_epochs else out
        res = merge_checkpoints(args.method, args.checkpoints, merged, weights=args.weights, options=options,
                                base=args.base, fishers=fishers, score=score, progress=progress)
    finally:
        close()
    merge_meta = json.loads(res.metadata["merge"])
    print(f"{res.path}: {args.method} merge of {len(args.checkpoints)} checkpoints, sha256 {res.sha256}, "
          f"{res.bytes_read / 1e6:.1f} MB read in {res.seconds:.1f} s"
          + (f", output read back once to hash it ({res.output_reread / 1e6:.1f} MB)" if res.output_reread else ""))
    if res.stats.get("fallback_entries"):
        from merging.fallback import fallback_summary
        from models.checkpoint import read_metadata

        b = read_metadata(args.checkpoints[0]).backbone
        print(fallback_summary(res.stats["fallback"], res.stats["fallback_entries"],
                               float(merge_meta.get("options", {}).get("epsilon", 0.0)), b.n_items, b.kind))
    if "selection" in merge_meta:
        sel = merge_meta["selection"]
        print("greedy-soup kept " + ", ".join(args.checkpoints[i] for i in sel["kept"]))
    if args.finetune_epochs:
        _finetune(args, ds, merged, out, merge_meta, res.sha256)
        print(f"{out}: fine-tuned {args.finetune_epochs} epoch(s) of {args.finetune_recipe} from {merged}")
    if args.evaluate:
        rows = [(Path(c).name, c) for c in args.checkpoints]
        if args.finetune_epochs:
            rows.append(("merged (raw)", str(merged)))
        rows.append(("merged", str(out)))
        print(_metrics_table(args, ds, rows, {str(merged): res.sha256}))
    return 0
