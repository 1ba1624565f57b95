"""`recmerge train`: every registered recipe option becomes a --flag; a flag that does not belong to
the chosen recipe is refused rather than silently ignored."""

from __future__ import annotations

import argparse
import json
import typing

from models.errors import RecmergeError
from models.recipes import RECIPES

_SCALARS = (bool, int, float, str)


def _option_fields() -> dict[str, tuple[type, str, set[str]]]:
    """Every option field of every recipe: name -> (type, help, recipes that accept it)."""
    fields: dict[str, tuple[type, str, set[str]]] = {}
    for rname, cls in RECIPES.items():
        for fname, info in cls.Options.model_fields.items():
            ann = info.annotation
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
    p.add_argument("--backbone", default="bert4rec", choices=["bert4rec", "sasrec"])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--inner", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--patience", type=int, default=5, help="early-stopping patience in epochs (0 = off)")
    p.add_argument("--max-minutes", type=float, help="stop after the epoch that crosses this budget")
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


def run(args) -> int:
    from models.data import PreparedDataset
    from models.train import TrainConfig, train

    cfg = TrainConfig(recipe=args.recipe, options=recipe_options_from_args(args), backbone=args.backbone,
                      hidden=args.hidden, layers=args.layers, heads=args.heads, inner=args.inner,
                      dropout=args.dropout, max_len=args.max_len, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      patience=args.patience, seed=args.seed, init=args.init, device=args.device,
                      max_minutes=args.max_minutes)
    ds = PreparedDataset.load(args.data)
    res = train(ds, cfg, args.out, show_bar=True)
    print(json.dumps({"checkpoint": str(res.checkpoint), "sha256": res.sha256, "best_epoch": res.best_epoch,
                      "valid": res.valid, "seconds": round(res.seconds, 1), "log": str(res.log_path)}))
    return 0
