"""`recmerge merge --method METHOD CKPT... --out M.safetensors` or `recmerge merge --config merge.yaml --out
M.safetensors`: merge checkpoints with any registered method (uniform, weighted, fisher, greedy-soup,
task-arithmetic, ties, dare, and the ones that choose on data: weight-search, regmean, adamerging), streamed
tensor by tensor; optionally fine-tune the merge and print its
metrics beside each ingredient's. Flags are turned into the same config document a file holds
(merging/config.py); the merged file records it, and a Markdown model card is written beside it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("merge", help="merge checkpoints (uniform, weighted, fisher, greedy-soup, task-arithmetic, "
                                     "ties, dare, weight-search, regmean, adamerging)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoints", nargs="*", metavar="CKPT", help="ingredient checkpoints (.safetensors)")
    p.add_argument("--config", help="a merge config (YAML or JSON; see docs/examples/), or a merged checkpoint "
                                    "whose recorded config is run again; replaces CKPT and the merge flags")
    p.add_argument("--method", help="merge method; an unknown name lists the known ones")
    p.add_argument("--out", required=True, help="merged checkpoint to write (.safetensors)")
    p.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per checkpoint (w_i or λ_i)")
    p.add_argument("--fisher", nargs="+", metavar="F",
                   help="one Fisher file per checkpoint (fisher method; estimated from --data when omitted)")
    p.add_argument("--base", help="base checkpoint for task-vector methods (task-arithmetic, ties, dare, adamerging, "
                                  "weight-search with combine=task-vectors)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="method option, repeatable: normalize=true, epsilon=1e-8, alpha=0.5, density=0.2, "
                        "p=0.9, seed=1, combine=ties, grid=51, combine=task-vectors, users=1000, steps=20")
    p.add_argument("--fisher-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="Fisher estimation setting when --fisher is omitted, repeatable (default sampling=topk, "
                        "n=10, max_users=4000, chosen to finish in minutes on ~30,000 users; e.g. sampling=exact, "
                        "n=30, computation=batchwise, max_users=all); the files are kept as "
                        "<out>.fisherN.safetensors")
    p.add_argument("--fisher-cache-dir", help="reuse Fishers estimated with the same checkpoint, data and settings")
    p.add_argument("--data", help="prepared dataset: needed by greedy-soup, weight-search, regmean, adamerging, "
                                  "--evaluate, --finetune-epochs and Fisher estimation")
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


def _estimate_fishers(args, ds, checkpoints: list[str], settings, origin: str) -> list[str]:
    """Fisher files for the fisher method when none are given, kept beside the output."""
    from app.progress import counting_bar
    from merging.fisher import estimate_fisher, fisher_users

    users = len(fisher_users(ds, settings))
    eligible = len(fisher_users(ds, settings.model_copy(update={"max_users": None})))
    chosen = ", ".join(f"{k}={v}" for k, v in settings.model_dump().items()
                       if k in ("sampling", "n", "max_users", "computation") and v is not None)
    print(f"fisher: estimating {len(checkpoints)} Fishers with {chosen} ({origin}): {users:,} of {eligible:,} "
          f"users" + ("" if users == eligible else f" (a seeded subsample, seed {settings.seed}; "
                                                    "--fisher-setting max_users=all for every user)"), flush=True)
    out, n = Path(args.out), len(checkpoints)
    paths = []
    for i, c in enumerate(checkpoints):
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
    cfg = TrainConfig.continuing(b, str(merged), recipe=args.finetune_recipe, epochs=args.finetune_epochs,
                                 patience=0, device=args.device)
    train(ds, cfg, out, show_bar=True)
    # The trainer records how it trained; the fine-tuned model also keeps what it was merged from.
    state, meta = load_checkpoint(out)
    meta.merge = merge_meta | {"finetune": {"recipe": args.finetune_recipe, "epochs": args.finetune_epochs,
                                            "from_sha256": merged_sha256}}
    save_checkpoint(out, state, meta)


METRIC_COLUMNS = [("valid", "ndcg@10"), ("valid", "hr@10"), ("test", "ndcg@10"), ("test", "hr@10"), ("test", "mrr")]


def _scores(args, ds, paths: list[tuple[str, str]], known_sha: dict[str, str]):
    """{label: {split: {"full": metrics}}} for each model, and the evaluation cache used (None when off).
    Scores already computed for the same checkpoint bytes, dataset, split and protocol come from the cache."""
    from models.checkpoint import file_sha256
    from models.eval_cache import EvaluationCache, default_dir
    from models.evaluate import evaluate, load_for_dataset
    from models.train import resolve_device

    device = resolve_device(args.device)
    cache = None if args.no_eval_cache else EvaluationCache(args.eval_cache_dir or default_dir())
    out = {}
    for label, path in paths:
        loaded = []

        def score(split, protocols, path=path, loaded=loaded):
            if not loaded:  # a model whose scores are all cached is never loaded
                loaded.append(load_for_dataset(path, ds, device=device)[0])
            return evaluate(loaded[0], ds, split=split, protocols=protocols, device=device)

        res = {}
        for split in ("valid", "test"):
            if cache is None:
                res[split] = score(split, ("full",))
            else:
                sha = known_sha.get(path) or file_sha256(path)
                res[split] = cache.evaluate(sha, ds.fingerprint, split, ("full",),
                                            lambda protocols, split=split: score(split, protocols))
        out[label] = res
    return out, cache


def _metrics_table(scores: dict, cache) -> str:
    width = max(len(label) for label in scores) + 2
    lines = [f"{'model':<{width}}" + "".join(f"{s + ' ' + m:>15}" for s, m in METRIC_COLUMNS)]
    for label, res in scores.items():
        lines.append(f"{label:<{width}}" + "".join(f"{res[s]['full'][m]:>15.4f}" for s, m in METRIC_COLUMNS))
    if cache is not None:
        lines.append(f"({cache.hits} of {cache.hits + cache.misses} evaluations reused from {cache.dir})")
    return "\n".join(lines)


def config_yaml(record: dict) -> str:
    import yaml

    return yaml.safe_dump(record, sort_keys=False, default_flow_style=False)


def _write_card(out: Path, checkpoints: list[str], base: str | None, scores: dict | None) -> Path:
    """`<out>.md` beside the merged file: models/card.py filled from the headers and the scores just printed."""
    from models.card import CardInput, Ingredient, render_card
    from models.checkpoint import file_sha256, read_metadata

    meta = read_metadata(out)
    merge = meta.merge or {}
    weights = merge.get("weights") or [None] * len(checkpoints)
    shas = merge.get("ingredients") or [file_sha256(c) for c in checkpoints]
    ings = [Ingredient(c, sha, read_metadata(c).recipe.get("name"), w)
            for c, sha, w in zip(checkpoints, shas, weights)]
    base_ing = Ingredient(base, merge.get("base") or file_sha256(base)) if base else None
    metrics = {}
    if scores:
        metrics = {(f"**{out.name}**" if label == "merged" else label): res for label, res in scores.items()}
    config = merge.get("config")
    reproduce = (f"```\nrecmerge merge --config {out} --out {out.name}\n```\n\nruns the config this file records "
                 "again and writes the same bytes (ingredient paths as below, relative to where the merge ran):\n\n"
                 f"```yaml\n{config_yaml(config)}```") if config else ""
    card = CardInput(name=out.name, kind="merged", meta=meta, sha256=file_sha256(out), size=out.stat().st_size,
                     metrics=metrics, ingredients=ings, base=base_ing, reproduce=reproduce)
    path = out.with_suffix(".md")
    path.write_text(render_card(card))
    return path


FLAG_ONLY = ("checkpoints", "method", "weights", "fisher", "base", "option", "fisher_setting")


def _document_from_flags(args) -> dict:
    """The config document the flags describe. The method's own checks run first, so flag mistakes get the
    messages that name flags (--weights, --option) rather than config fields."""
    from merging.merge import build_method
    from merging.methods import MergeOptionsError
    from models.errors import RecmergeError

    if not args.method or not args.checkpoints:
        raise RecmergeError("give --method and the checkpoints to merge, or --config")
    n = len(args.checkpoints)
    options = parse_options(args.option)
    build_method(args.method, n, options, args.weights)
    if args.fisher and args.fisher_setting:
        raise RecmergeError("--fisher-setting applies only when the Fishers are estimated (no --fisher)")
    if args.fisher and len(args.fisher) != n:
        raise MergeOptionsError(f"{args.method}: got {len(args.fisher)} Fisher files for {n} checkpoints")
    models = []
    for i, c in enumerate(args.checkpoints):
        params = {}
        if args.weights is not None:
            params["weight"] = args.weights[i]
        if args.fisher:
            params["fisher"] = args.fisher[i]
        models.append({"model": c, "parameters": params})
    settings = parse_options(args.fisher_setting, "--fisher-setting") or None
    return {"merge_method": args.method, "models": models, "base_model": args.base, "parameters": options,
            "fisher": settings, "dataset": args.data}


def _document_from_file(args) -> dict:
    from merging.config import load_document
    from models.checkpoint import read_metadata
    from models.errors import RecmergeError

    given = [f"--{k.replace('_', '-')}" if k != "checkpoints" else "CKPT" for k in FLAG_ONLY if getattr(args, k)]
    if given:
        raise RecmergeError(f"--config replaces {', '.join(given)}: give the merge either as a config or as flags")
    path = Path(args.config)
    if path.suffix == ".safetensors":
        merge = read_metadata(path).merge or {}
        if "config" not in merge:
            raise RecmergeError(f"{path}: records no merge config (not a merge, or merged before configs were "
                                "recorded)")
        doc = dict(merge["config"])
    else:
        doc = load_document(path.read_text(), str(path))
    if args.data:
        if doc.get("dataset") not in (None, args.data):
            raise RecmergeError(f"--data {args.data} differs from the config's dataset {doc['dataset']}")
        doc["dataset"] = args.data
    return doc


def run(args) -> int:
    from app.progress import progress_bars
    from merging.config import parse_config
    from merging.merge import merge_checkpoints
    from models.errors import RecmergeError

    out = Path(args.out)
    if out.suffix != ".safetensors":
        raise RecmergeError(f"{out}: the merged checkpoint must end in .safetensors")
    if args.finetune_epochs < 0:
        raise RecmergeError(f"--finetune-epochs must be >= 0 (got {args.finetune_epochs})")
    doc = _document_from_file(args) if args.config else _document_from_flags(args)
    cfg = parse_config(doc, args.config or "merge", needs_files=True)
    checkpoints = [m.model for m in cfg.models]
    settings = cfg.fisher_settings()
    needs_data = [why for cond, why in [(cfg.method.uses_data(), cfg.merge_method),
                                        (settings is not None, "fisher without Fisher files"),
                                        (args.finetune_epochs, "--finetune-epochs"), (args.evaluate, "--evaluate")]
                  if cond]
    ds = None
    if needs_data:
        args.data = args.data or cfg.dataset
        ds = _load_dataset(args, needs_data[0])
        _check_dataset(ds, checkpoints + ([cfg.base_model] if cfg.base_model else []))

    progress, close = progress_bars()
    try:
        fishers = cfg.fisher_files
        if settings is not None:
            from merging.compat import check_compatible

            check_compatible(checkpoints)  # refuse mismatched checkpoints before spending time on Fishers
            origin = "defaults" if not cfg.fisher else (
                "defaults, overridden by " + ("the config" if args.config else "--fisher-setting"))
            fishers = _estimate_fishers(args, ds, checkpoints, settings, origin)
        data_fns = {}
        if cfg.method.uses_data():  # the score, Gram matrices or objective the method chooses its merge by
            from core.merge_inputs import merge_inputs
            from models.checkpoint import read_metadata

            data_fns = merge_inputs(cfg.merge_method, cfg.parameters, ds, read_metadata(checkpoints[0]).backbone,
                                    args.device)
        merged = out.with_name(out.name.removesuffix(".safetensors") + ".raw.safetensors") \
            if args.finetune_epochs else out
        res = merge_checkpoints(cfg.merge_method, checkpoints, merged, weights=cfg.weights, options=cfg.parameters,
                                base=cfg.base_model, fishers=fishers, progress=progress, **data_fns,
                                config=cfg.record())
    finally:
        close()
    merge_meta = json.loads(res.metadata["merge"])
    print(f"{res.path}: {cfg.merge_method} merge of {len(checkpoints)} checkpoints, sha256 {res.sha256}, "
          f"{res.bytes_read / 1e6:.1f} MB read in {res.seconds:.1f} s"
          + (f", output read back once to hash it ({res.output_reread / 1e6:.1f} MB)" if res.output_reread else ""))
    if res.stats.get("fallback_entries"):
        from merging.fallback import fallback_summary
        from models.checkpoint import read_metadata

        b = read_metadata(checkpoints[0]).backbone
        print(fallback_summary(res.stats["fallback"], res.stats["fallback_entries"],
                               float(merge_meta.get("options", {}).get("epsilon", 0.0)), b.n_items, b.kind))
    if "search" in merge_meta:
        sr = merge_meta["search"]
        print(f"weight-search: {len(sr['candidates'])} candidates scored; best validation score {sr['score']:.4f} "
              f"with coefficients {', '.join(f'{c:.4g}' for c in sr['coefficients'])}")
    if "selection" in merge_meta:
        sel = merge_meta["selection"]
        print("greedy-soup kept " + ", ".join(checkpoints[i] for i in sel["kept"]))
    if args.finetune_epochs:
        _finetune(args, ds, merged, out, merge_meta, res.sha256)
        print(f"{out}: fine-tuned {args.finetune_epochs} epoch(s) of {args.finetune_recipe} from {merged}")
    scores = None
    if args.evaluate:
        rows = [(Path(c).name, c) for c in checkpoints]
        if args.finetune_epochs:
            rows.append(("merged (raw)", str(merged)))
        rows.append(("merged", str(out)))
        scores, cache = _scores(args, ds, rows, {str(merged): res.sha256})
        print(_metrics_table(scores, cache))
    card = _write_card(out, checkpoints, cfg.base_model, scores)
    print(f"{card}: model card")
    return 0
