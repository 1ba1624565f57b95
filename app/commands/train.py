"""`recmerge train`: every registered recipe option becomes a --flag; a flag that does not belong to
the chosen recipe is refused rather than silently ignored."""

from __future__ import annotations

import argparse
import json
import typing

from models.errors import RecmergeError
from models.recipes import RECIPES

_SCALARS = (bool, int, float, str)


def _default_config():
    """TrainConfig's field defaults as declared: "auto" design fields stay "auto" until the backbone is known."""
    from dataclasses import MISSING, fields
    from types import SimpleNamespace

    from models.train import TrainConfig
    return SimpleNamespace(**{f.name: f.default if f.default is not MISSING else f.default_factory()
                              for f in fields(TrainConfig)})


_DEFAULTS = _default_config()


def _option_fields() -> dict[str, tuple[type, str, set[str]]]:
    """Every option field of every recipe: name -> (type, help, recipes that accept it)."""
    fields: dict[str, tuple[type, str, set[str]]] = {}
    for rname, cls in RECIPES.items():
        for fname, info in cls.Options.model_fields.items():
            ann = info.annotation
            if type(None) in typing.get_args(ann):  # `X | None`: None is the default, the flag gives an X
                ann = next(a for a in typing.get_args(ann) if a is not type(None))
            if typing.get_origin(ann) is typing.Literal:
                ann = type(typing.get_args(ann)[0])
            if ann not in _SCALARS:
                ann = str
            prev = fields.get(fname)
            owners = (prev[2] if prev else set()) | {rname}
            fields[fname] = (ann, info.description or "", owners)
    return fields


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def register(sub) -> None:
    p = sub.add_parser("train", help="train a recommender with a recipe",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, help="prepared dataset directory")
    p.add_argument("--recipe", default="bert4rec", help=f"one of: {', '.join(RECIPES)}")
    p.add_argument("--out", required=True, help="output checkpoint (.safetensors)")
    p.add_argument("--init", help="start from this checkpoint (fine-tune setting)")
    p.add_argument("--backbone", choices=["bert4rec", "sasrec"],
                   help="default: bert4rec, or the --init checkpoint's")
    shape = p.add_argument_group("backbone shape (default: TrainConfig's, or the --init checkpoint's)")
    from models.config import DESIGN_FIELDS, design_help
    for flag, typ in _SHAPE_FLAGS.items():
        default = design_help(flag) if flag in DESIGN_FIELDS else getattr(_DEFAULTS, flag)
        shape.add_argument(f"--{flag.replace('_', '-')}", dest=flag, type=typ, default=None, help=f"default {default}")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=None,
                   help="default: 200, or with --max-minutes as many as the budget allows")
    o.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size)
    o.add_argument("--lr", type=float, default=_DEFAULTS.lr)
    o.add_argument("--weight-decay", type=float, default=_DEFAULTS.weight_decay)
    o.add_argument("--schedule", choices=["constant", "cosine"], default=_DEFAULTS.schedule,
                   help="learning rate over the run (cosine runs over --max-minutes when that is set)")
    o.add_argument("--warmup-steps", type=int, default=_DEFAULTS.warmup_steps)
    o.add_argument("--final-lr-ratio", type=float, default=_DEFAULTS.final_lr_ratio)
    o.add_argument("--patience", type=int, default=_DEFAULTS.patience,
                   help="early stopping after this many evaluations without gain (0 = off)")
    o.add_argument("--eval-every", type=int, default=_DEFAULTS.eval_every, help="validate every k epochs")
    o.add_argument("--max-minutes", type=float,
                   help="wall-clock budget: the schedule runs over it, the epoch that crosses it is the last")
    o.add_argument("--resume", action="store_true",
                   help="continue the run whose state (OUT.state.safetensors) sits beside --out")
    o.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    o.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=_DEFAULTS.precision,
                   help="products in bfloat16 (bf16) or float32; auto: bf16 where the hardware makes it "
                        "fast (CPUs with AMX, CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    g = p.add_argument_group("recipe options (each belongs to the recipes named in its help)")
    for name, (typ, text, owners) in sorted(_option_fields().items()):
        g.add_argument(f"--{name.replace('_', '-')}", dest=f"opt_{name}", default=None,
                       type=_parse_bool if typ is bool else typ,
                       help=f"{text} [{', '.join(sorted(owners))}]".strip())
    p.set_defaults(func=run)


def recipe_options_from_args(args) -> dict:
    fields = _option_fields()
    given = {k[4:]: v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    foreign = [k for k in given if args.recipe in RECIPES and args.recipe not in fields[k][2]]
    if foreign:
        flags = ", ".join("--" + k.replace("_", "-") for k in foreign)
        raise RecmergeError(f"{flags} not an option of recipe {args.recipe!r}")
    return given


_SHAPE_FLAGS = {"max_len": int, "hidden": int, "layers": int, "heads": int, "inner": int, "dropout": float,
                "norm": str, "head": _parse_bool, "activation": str, "positions": str}


def backbone_settings(args) -> dict:
    """The backbone's shape: explicit flags win; with --init the rest comes from the checkpoint (so a
    fine-tune never has to repeat the base's shape), otherwise from TrainConfig's defaults."""
    from dataclasses import asdict

    given = {k: getattr(args, k) for k in ("backbone", *_SHAPE_FLAGS) if getattr(args, k, None) is not None}
    if args.init:
        from models.checkpoint import read_metadata

        base = asdict(read_metadata(args.init).backbone)
        base["backbone"] = base.pop("kind")
    else:
        base = {k: getattr(_DEFAULTS, k) for k in ("backbone", *_SHAPE_FLAGS)}
    return {k: given.get(k, base[k]) for k in ("backbone", *_SHAPE_FLAGS)}


def run(args) -> int:
    from models.data import PreparedDataset
    from models.train import TrainConfig, train

    cfg = TrainConfig(recipe=args.recipe, options=recipe_options_from_args(args), **backbone_settings(args),
                      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.weight_decay, schedule=args.schedule, warmup_steps=args.warmup_steps,
                      final_lr_ratio=args.final_lr_ratio, patience=args.patience, eval_every=args.eval_every,
                      seed=args.seed, init=args.init, device=args.device, threads=args.threads,
                      max_minutes=args.max_minutes, resume=args.resume, precision=args.precision)
    ds = PreparedDataset.load(args.data)
    res = train(ds, cfg, args.out, show_bar=True)
    print(json.dumps({"checkpoint": str(res.checkpoint), "sha256": res.sha256, "best_epoch": res.best_epoch,
                      "valid": res.valid, "seconds": round(res.seconds, 1), "log": str(res.log_path)}))
    return 0
