"""Rebuild the order of ML-1M that published sequential-recommendation figures were measured on (the
SASRec repository's ml-1m.txt: items with < 5 ratings dropped, each user's ratings in its own order of
ties), in the original GroupLens ids, and count where it differs from ../shared/data/ml-1m.

Why: the shared copy sorts each user's ratings by timestamp with an unstable sort, so the order among
ratings given in the same second is arbitrary; the published figures (SASRec+, BERT4Rec, gSASRec, ...)
come from another order of the same ratings. Its test and validation items differ from ours for many
users, so the two protocols are not the same task.

Inputs (public files, not part of this project; pass the folders that hold them):
  --split    the per-user split of that file published with gSASRec-pytorch (datasets/ml1m/):
             train/input.txt (each user's items but the last two, or the last three for its validation
             users), val/input.txt + val/output.txt (those users' items but the last two, and the second
             to last), test/output.txt (each user's last item); lines in SASRec user order
  --mapping  sas_to_original_items.txt and sas_to_original_users.txt (asash/ml1m-sas-mapping)
  --shared   ../shared/data/ml-1m/ml-1m.seq.tsv: every user's set of items, which fixes the one item
             the split files leave out (the second to last of a user without validation)

    .venv/bin/python bench/sas_order.py --split SPLIT --mapping MAP --shared ../shared/data/ml-1m \
        --out /tmp/ml-1m-sasorder.txt
    .venv/bin/recmerge data prepare --source /tmp/ml-1m-sasorder.txt --format sasrec --out data/ml-1m-sas

Writes "user item" lines (original ids, each user's ratings in order) and prints how many users' test and
validation items differ between the two orders. Refuses, naming the user, wherever the files disagree.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def read_rows(path: Path) -> list[list[int]]:
    try:
        return [[int(x) for x in line.split()] for line in path.read_text().splitlines() if line.strip()]
    except ValueError as e:
        sys.exit(f"{path}: not whitespace-separated integers ({e})")


def read_map(path: Path) -> dict[int, int]:
    rows = read_rows(path)
    if any(len(r) != 2 for r in rows):
        sys.exit(f"{path}: every line must be 'sas_id original_id'")
    out = dict((a, b) for a, b in rows)
    if len(out) != len(rows) or len(set(out.values())) != len(out):
        sys.exit(f"{path}: the mapping is not one-to-one")
    return out


def shared_sequences(path: Path) -> dict[int, list[int]]:
    seq: dict[int, list[tuple[int, int]]] = {}
    with path.open() as f:
        for row in csv.DictReader(f, delimiter="\t"):
            seq.setdefault(int(row["user_id"]), []).append((int(row["seq_idx"]), int(row["item_id"])))
    return {u: [i for _, i in sorted(r)] for u, r in seq.items()}


def rebuild(split: Path, items: dict[int, int], users: dict[int, int],
            shared: dict[int, list[int]]) -> dict[int, list[int]]:
    """Every user's full sequence in the published order, in original ids."""
    train = read_rows(split / "train" / "input.txt")
    val_in = read_rows(split / "val" / "input.txt")
    val_out = [r[0] for r in read_rows(split / "val" / "output.txt")]
    test_out = [r[0] for r in read_rows(split / "test" / "output.txt")]
    if len(train) != len(test_out) or len(val_in) != len(val_out):
        sys.exit(f"{split}: {len(train)} train lines against {len(test_out)} test lines, "
                 f"{len(val_in)} validation inputs against {len(val_out)} outputs")
    if len(train) != len(users):
        sys.exit(f"{split}: {len(train)} users, the mapping has {len(users)}")
    kept = set(items.values())
    sas_inverse = {o: s for s, o in items.items()}
    out: dict[int, list[int]] = {}
    v = 0
    for k, prefix in enumerate(train):
        sas_user = k + 1
        user = users.get(sas_user)
        if user is None or user not in shared:
            sys.exit(f"SASRec user {sas_user}: not in the mapping or not in the shared data")
        theirs = {i for i in shared[user] if i in kept}
        # a validation user's training line is its validation input less one item (sequences are unique)
        if v < len(val_in) and val_in[v][:-1] == prefix:
            full = val_in[v] + [val_out[v], test_out[k]]
            v += 1
        else:
            rest = {sas_inverse[i] for i in theirs} - set(prefix) - {test_out[k]}
            if len(rest) != 1:
                sys.exit(f"SASRec user {sas_user} (user {user}): {len(rest)} items unaccounted for, expected 1")
            full = prefix + [rest.pop(), test_out[k]]
        try:
            seq = [items[i] for i in full]
        except KeyError as e:
            sys.exit(f"SASRec user {sas_user}: item {e} is not in the mapping")
        if sorted(seq) != sorted(theirs):
            sys.exit(f"SASRec user {sas_user} (user {user}): its items differ from the shared data's")
        out[user] = seq
    if v != len(val_in):
        sys.exit(f"{split}: {len(val_in) - v} validation inputs matched no user")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", type=Path, required=True)
    ap.add_argument("--mapping", type=Path, required=True)
    ap.add_argument("--shared", type=Path, required=True, help="../shared/data/ml-1m or its ml-1m.seq.tsv")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    tsv = args.shared / "ml-1m.seq.tsv" if args.shared.is_dir() else args.shared
    items = read_map(args.mapping / "sas_to_original_items.txt")
    users = read_map(args.mapping / "sas_to_original_users.txt")
    shared = shared_sequences(tsv)
    published = rebuild(args.split, items, users, shared)
    kept = set(items.values())
    ours = {u: [i for i in s if i in kept] for u, s in shared.items()}
    n = len(published)
    test_diff = sum(published[u][-1] != ours[u][-1] for u in published)
    valid_diff = sum(published[u][-2] != ours[u][-2] for u in published)
    either = sum(published[u][-2:] != ours[u][-2:] for u in published)
    moved = sum(a != b for u in published for a, b in zip(published[u], ours[u]))
    total = sum(len(s) for s in published.values())
    tmp = args.out.with_name(args.out.name + ".tmp")
    with tmp.open("w") as f:
        for u in sorted(published):
            f.writelines(f"{u} {i}\n" for i in published[u])
    tmp.replace(args.out)
    print(f"{args.out}: {n} users, {len(kept)} items, {total} interactions")
    print(f"test item differs from the shared order for {test_diff} users ({test_diff / n:.1%}), "
          f"validation item for {valid_diff} ({valid_diff / n:.1%}), either for {either} ({either / n:.1%}); "
          f"{moved} of {total} positions ({moved / total:.1%}) hold another item")


if __name__ == "__main__":
    main()
