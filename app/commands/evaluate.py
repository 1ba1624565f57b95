"""`recmerge evaluate CKPT --data DIR`: every protocol of SPEC §4 from one pass over the split's users;
`--json` prints one object {protocol: {metric: value}}."""

from __future__ import annotations

import argparse
import json

PROTOCOL_CHOICES = ("full", "random100", "popular100", "top-popular100")  # models.evaluate.PROTOCOLS, import-free


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a prepared dataset",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="model checkpoint (.safetensors)")
    p.add_argument("--data", required=True, help="prepared dataset directory the model was trained on")
    p.add_argument("--split", choices=("valid", "test"), default="test")
    p.add_argument("--protocols", nargs="+", default=list(PROTOCOL_CHOICES), metavar="PROTOCOL",
                   help=f"any of: {', '.join(PROTOCOL_CHOICES)} (space or comma separated)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled negative lists")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--representation", action="store_true",
                   help="also report uniformity/alignment of item embeddings and sequence representations")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def split_protocols(values: list[str]) -> list[str]:
    return [p for v in values for p in v.split(",") if p]


def open_model(checkpoint: str, data: str, device: str | None):
    """(model, meta, dataset): the checkpoint is checked before the (slower) dataset is read, and a
    checkpoint trained on another dataset is refused."""
    from models.checkpoint import read_metadata
    from models.data import PreparedDataset
    from models.evaluate import load_for_dataset
    from models.train import resolve_device

    read_metadata(checkpoint)  # fail fast on a file that is not a recmerge safetensors checkpoint
    ds = PreparedDataset.load(data)
    model, meta = load_for_dataset(checkpoint, ds, device=resolve_device(device))
    return model, meta, ds


def format_table(result: dict[str, dict[str, float]]) -> str:
    metrics = list(next(iter(result.values())))
    lines = [f"{'protocol':<16}" + "".join(f"{m:>10}" for m in metrics)]
    for protocol, values in result.items():
        lines.append(f"{protocol:<16}" + "".join(f"{values[m]:>10.4f}" for m in metrics))
    return "\n".join(lines)


def run(args) -> int:
    from app.progress import progress_bars
    from models.evaluate import check_protocols, evaluate

    protocols = check_protocols(split_protocols(args.protocols))
    model, _, ds = open_model(args.checkpoint, args.data, args.device)
    progress, close = progress_bars()
    try:
        result: dict = evaluate(model, ds, split=args.split, protocols=protocols, seed=args.seed,
                                batch_size=args.batch_size, progress=progress)
    finally:
        close()
    representation = None
    if args.representation:
        from models.representation import representation_metrics

        representation = representation_metrics(model, ds, split=args.split, seed=args.seed,
                                                batch_size=args.batch_size)
    if args.json:
        if representation is not None:
            result["representation"] = representation
        print(json.dumps(result))
        return 0
    print(f"{args.checkpoint} on {ds.path} ({args.split}, {ds.n_users:,} users, negatives seed {args.seed})")
    print(format_table(result))
    if representation is not None:
        print("\n".join(f"{k:<16}{v:>10.4f}" for k, v in representation.items()))
    return 0
