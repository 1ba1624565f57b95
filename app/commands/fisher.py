"""`recmerge fisher CKPT --data DIR --sampling topk --n 30 --out F.safetensors`: the diagonal Fisher of a
checkpoint over the dataset's training sequences (SPEC §5), with a progress bar in sequences/s."""

from __future__ import annotations

import argparse

SAMPLINGS = ("exact", "random", "topk", "model", "target")  # merging.item_selection.SAMPLINGS, import-free
COMPUTATIONS = ("per-example", "batchwise")


def register(sub) -> None:
    p = sub.add_parser("fisher", help="estimate the diagonal Fisher of a checkpoint",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="model checkpoint (.safetensors)")
    p.add_argument("--data", required=True, help="prepared dataset directory the model was trained on")
    p.add_argument("--sampling", required=True, choices=SAMPLINGS,
                   help="items per sequence: all (exact), n uniform (random), n most probable (topk), "
                        "n drawn from the model (model), the true next item (target)")
    p.add_argument("--n", type=int, help="items per sequence for random/topk/model")
    p.add_argument("--computation", choices=COMPUTATIONS, default="per-example",
                   help="per-example squared gradients, or the thesis's batchwise approximation (eq. 3.10)")
    p.add_argument("--batch-size", type=int, default=64,
                   help="sequences per forward pass (batchwise: also the batch whose gradient is squared)")
    p.add_argument("--seed", type=int, default=0, help="seed of random/model draws and of --max-users")
    p.add_argument("--max-users", type=int, help="estimate on a seeded random subset of this many users")
    p.add_argument("--out", help="output Fisher file (.safetensors)")
    p.add_argument("--cache-dir", help="reuse a Fisher with the same checkpoint, dataset and settings from here")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.set_defaults(func=run)


def run(args) -> int:
    from app.progress import counting_bar
    from merging.fisher import estimate_fisher, fisher_users, parse_settings
    from models.checkpoint import read_metadata
    from models.data import PreparedDataset
    from models.errors import RecmergeError

    if args.out is None and args.cache_dir is None:
        raise RecmergeError("give --out (and/or --cache-dir)")
    settings = parse_settings({"sampling": args.sampling, "n": args.n, "computation": args.computation,
                               "batch_size": args.batch_size, "seed": args.seed, "max_users": args.max_users})
    read_metadata(args.checkpoint)  # fail fast on a file that is not a recmerge checkpoint
    ds = PreparedDataset.load(args.data)
    total = len(fisher_users(ds, settings))
    progress, close = counting_bar(total, "seq", f"fisher {settings.sampling}")
    try:
        result = estimate_fisher(args.checkpoint, ds, settings, out=args.out, cache_dir=args.cache_dir,
                                 progress=progress, device=args.device)
    finally:
        close()
    how = "reused from cache" if result.cached else f"{result.seconds:.1f} s"
    print(f"{result.path}: Fisher over {result.metadata['examples']} sequences "
          f"(sampling {settings.sampling}, n {result.metadata['n']}, {settings.computation}; {how})")
    return 0
