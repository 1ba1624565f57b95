"""`recmerge recommend CKPT --data DIR --user ID`: top-k next items for a known user (original ids),
the user's whole known history excluded."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("recommend", help="top-k recommendations for a user of the dataset",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="model checkpoint (.safetensors)")
    p.add_argument("--data", required=True, help="prepared dataset directory the model was trained on")
    p.add_argument("--user", required=True, help="original user id, as in the source file")
    p.add_argument("--k", type=int, default=10, help="how many items (1..n_items)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    from app.commands.evaluate import open_model
    from models.recommend import check_k, recommend_for_user

    model, _, ds = open_model(args.checkpoint, args.data, args.device)
    check_k(args.k, ds.n_items)
    recs = recommend_for_user(model, ds, args.user, args.k)
    if args.json:
        print(json.dumps({"user": args.user, "k": args.k, "items": recs}))
        return 0
    print(f"user {args.user}: top {len(recs)} of {ds.n_items:,} items (history of "
          f"{len(ds.sequence(ds.user_index(args.user)))} excluded)")
    print(f"{'rank':>4}  {'item':>10}  {'score':>9}  title")
    for rank, r in enumerate(recs, 1):
        print(f"{rank:>4}  {str(r['item']):>10}  {r['score']:>9.4f}  {r['title'] or ''}")
    return 0
