"""`recmerge compare A B --data DIR`: error inconsistency (% of users where exactly one of the two
models reaches NDCG@10 > 0.5, full ranking) beside each model's NDCG@10."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("compare", help="error inconsistency between two checkpoints",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint_a", help="first checkpoint (.safetensors)")
    p.add_argument("checkpoint_b", help="second checkpoint (.safetensors)")
    p.add_argument("--data", required=True, help="prepared dataset directory both were trained on")
    p.add_argument("--split", choices=("valid", "test"), default="test")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from app.commands.evaluate import open_model
    from models.evaluate import load_for_dataset, per_user_ndcg
    from models.metrics import error_inconsistency
    from models.train import resolve_device

    model_a, _, ds = open_model(args.checkpoint_a, args.data, args.device)
    model_b, _ = load_for_dataset(args.checkpoint_b, ds, device=resolve_device(args.device))
    a = per_user_ndcg(model_a, ds, split=args.split, batch_size=args.batch_size)
    b = per_user_ndcg(model_b, ds, split=args.split, batch_size=args.batch_size)
    out = {"error_inconsistency": error_inconsistency(a, b), "users": len(a),
           "ndcg@10": {"a": float(a.mean()), "b": float(b.mean())}}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{args.split}, {len(a):,} users, full ranking")
    print(f"NDCG@10  A {out['ndcg@10']['a']:.4f}  ({args.checkpoint_a})")
    print(f"NDCG@10  B {out['ndcg@10']['b']:.4f}  ({args.checkpoint_b})")
    print(f"error inconsistency: {out['error_inconsistency']:.2f}% of users have NDCG@10 > 0.5 "
          "under exactly one model")
    return 0
