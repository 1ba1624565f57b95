"""`recmerge data prepare`: turn an interactions file (or `ml-100k`, downloaded) into a prepared
dataset directory and print a one-line summary."""

from __future__ import annotations

import argparse

FORMAT_CHOICES = ("ml-100k", "ml-1m", "recbole", "sasrec", "csv")  # models.readers.FORMATS, kept import-free


def register(sub) -> None:
    p = sub.add_parser("data", help="prepare datasets")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    prep = data_sub.add_parser(
        "prepare", help="read interactions, filter, remap ids, split leave-one-out, write a directory",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    prep.add_argument("--source", required=True,
                      help="interactions file, a directory holding one, or 'ml-100k' (downloaded and cached)")
    prep.add_argument("--format", choices=FORMAT_CHOICES, help="override format detection")
    prep.add_argument("--min-user", type=int, default=5, help="drop users with fewer interactions (>= 3)")
    prep.add_argument("--min-item", type=int, default=0, help="drop items with fewer interactions")
    prep.add_argument("--user-col", help="user column name (csv/recbole)")
    prep.add_argument("--item-col", help="item column name (csv/recbole)")
    prep.add_argument("--order-col", help="time or order column name (csv/recbole)")
    prep.add_argument("--out", required=True, help="output directory (created atomically)")
    prep.set_defaults(func=run_prepare)


def run_prepare(args) -> int:
    from app.progress import progress_bars
    from models.data import prepare_dataset

    progress, close = progress_bars()
    try:
        ds = prepare_dataset(args.source, args.out, fmt=args.format, min_user=args.min_user,
                             min_item=args.min_item, user_col=args.user_col, item_col=args.item_col,
                             order_col=args.order_col, progress=progress)
    finally:
        close()
    for line in filter_report(ds.meta.get("filters", {})):
        print(line)
    print(f"{ds.path}: {ds.n_users:,} users, {ds.n_items:,} items, {ds.n_interactions:,} interactions, "
          f"fingerprint {ds.fingerprint}")
    return 0


def filter_report(filters: dict) -> list[str]:
    """One line for what was read and one per filter with what it removed (empty for datasets prepared
    before the counts were recorded)."""
    removed = filters.get("removed")
    if not removed:
        return []
    def n(count: int, noun: str) -> str:
        return f"{count:,} {noun}" + ("" if count == 1 else "s")

    read = removed["read"]
    lines = [f"read {n(read['interactions'], 'interaction')} of {n(read['users'], 'user')} and "
             f"{n(read['items'], 'item')}"]
    for name, thing in (("min_item", "item"), ("min_user", "user")):
        took, limit = removed[name], filters[name]
        what = f"--{name.replace('_', '-')} {limit}"
        if not took["interactions"]:
            lines.append(f"{what}: removed nothing")
            continue
        other = "item" if thing == "user" else "user"
        also = f"; left {n(took[other + 's'], other)} with none" if took[other + "s"] else ""
        lines.append(f"{what}: removed {n(took[thing + 's'], thing)} with fewer than {limit} interactions "
                     f"({n(took['interactions'], 'interaction')}{also})")
    if removed["rounds"] > 2:  # the last round only confirms that nothing more goes
        lines.append(f"(the filters took turns {removed['rounds'] - 1} times: what one removed made the other "
                     "remove more)")
    return lines
