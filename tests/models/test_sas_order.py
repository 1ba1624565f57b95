"""bench/sas_order.py rebuilds every user's whole sequence from the published split files (where one item
per user without validation is missing) and refuses files that disagree with the shared data."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "sas_order.py"

# Original ids: users 10, 20, 30; items 100..106. The published order renumbers both (SASRec ids 1..).
PUBLISHED = {10: [101, 100, 102, 103, 104], 20: [105, 100, 101, 106, 102], 30: [103, 104, 105, 106]}
SAS_USERS = {1: 20, 2: 10, 3: 30}
SAS_ITEMS = {1: 100, 2: 101, 3: 102, 4: 103, 5: 104, 6: 105, 7: 106}


def write_case(tmp: Path, published: dict, validation_users: set, shared: dict) -> tuple[Path, Path, Path]:
    to_sas = {o: s for s, o in SAS_ITEMS.items()}
    split, mapping = tmp / "split", tmp / "map"
    for d in ("train", "val", "test"):
        (split / d).mkdir(parents=True)
    mapping.mkdir()
    train, vin, vout, tout = [], [], [], []
    for sas_user in sorted(SAS_USERS):
        seq = [to_sas[i] for i in published[SAS_USERS[sas_user]]]
        if sas_user in validation_users:
            train.append(seq[:-3])
            vin.append(seq[:-2])
            vout.append(seq[-2])
        else:
            train.append(seq[:-2])
        tout.append(seq[-1])
    (split / "train" / "input.txt").write_text("".join(" ".join(map(str, r)) + "\n" for r in train))
    (split / "val" / "input.txt").write_text("".join(" ".join(map(str, r)) + "\n" for r in vin))
    (split / "val" / "output.txt").write_text("".join(f"{x}\n" for x in vout))
    (split / "test" / "output.txt").write_text("".join(f"{x}\n" for x in tout))
    (mapping / "sas_to_original_items.txt").write_text("".join(f"{s} {o}\n" for s, o in SAS_ITEMS.items()))
    (mapping / "sas_to_original_users.txt").write_text("".join(f"{s} {o}\n" for s, o in SAS_USERS.items()))
    tsv = tmp / "ml-1m.seq.tsv"
    tsv.write_text("user_id\titem_id\tseq_idx\n" + "".join(
        f"{u}\t{i}\t{k}\n" for u, seq in shared.items() for k, i in enumerate(seq)))
    return split, mapping, tsv


def run(split, mapping, tsv, out):
    return subprocess.run([sys.executable, str(SCRIPT), "--split", str(split), "--mapping", str(mapping),
                           "--shared", str(tsv), "--out", str(out)], capture_output=True, text=True, timeout=60)


def test_rebuilds_the_published_order_and_counts_where_it_differs(tmp_path):
    # the shared copy holds the same items per user in another order of ties (and an item, 107, that the
    # published version dropped): user 10's last two are swapped, user 30's second to last differs
    shared = {10: [100, 101, 102, 104, 103], 20: [105, 100, 101, 106, 102, 107], 30: [103, 105, 104, 106]}
    split, mapping, tsv = write_case(tmp_path, PUBLISHED, {1}, shared)
    out = tmp_path / "order.txt"
    res = run(split, mapping, tsv, out)
    assert res.returncode == 0, res.stderr
    got: dict[int, list[int]] = {}
    for line in out.read_text().splitlines():
        u, i = map(int, line.split())
        got.setdefault(u, []).append(i)
    assert got == PUBLISHED
    assert "test item differs from the shared order for 1 users" in res.stdout
    assert "validation item for 2 " in res.stdout


def test_refuses_a_user_whose_items_disagree_and_writes_nothing(tmp_path):
    shared = {10: [100, 101, 102, 103, 104], 20: [105, 100, 101, 106, 102], 30: [103, 104, 105, 100]}
    split, mapping, tsv = write_case(tmp_path, PUBLISHED, {1}, shared)
    out = tmp_path / "order.txt"
    res = run(split, mapping, tsv, out)
    assert res.returncode != 0
    assert "user 30" in res.stderr
    assert not out.exists() and not list(tmp_path.glob("order.txt*"))


@pytest.mark.parametrize("broken", ["val/output.txt", "train/input.txt"])
def test_refuses_split_files_of_unequal_length(tmp_path, broken):
    split, mapping, tsv = write_case(tmp_path, PUBLISHED, {1}, PUBLISHED)
    path = split / broken
    path.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")
    res = run(split, mapping, tsv, tmp_path / "order.txt")
    assert res.returncode != 0 and ("lines" in res.stderr or "validation" in res.stderr), res.stderr
