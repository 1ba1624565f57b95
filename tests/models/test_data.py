"""Prepared datasets: ordering, filters, remapping, leave-one-out, fingerprint, verification, real data."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from models.data import PreparedDataset, compute_fingerprint, prepare_dataset
from models.errors import DataError
from tests.synthetic import make_planted_dataset, planted_next

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def needs_data(name: str) -> Path:
    if not DATA.is_dir():
        pytest.skip(f"{DATA} is absent")
    return DATA / name


def csv(path: Path, rows: list[tuple], header="user,item,timestamp") -> Path:
    path.write_text(header + "\n" + "".join(",".join(map(str, r)) + "\n" for r in rows))
    return path


def originals(ds: PreparedDataset, seq) -> list[str]:
    return [ds.item_ids[i - 1] for i in seq]


# Users interleaved, several ties in time: the order within a tie must be the file order.
TIES = [
    ("a", 10, 5), ("b", 30, 1), ("a", 11, 3), ("a", 12, 5), ("b", 31, 1), ("a", 13, 3),
    ("b", 32, 0), ("a", 14, 9), ("b", 33, 1), ("b", 10, 2),
]


def test_stable_chronological_order_and_leave_one_out(tmp_path):
    ds = prepare_dataset(csv(tmp_path / "ties.csv", TIES), tmp_path / "out", min_user=3)
    assert ds.user_ids == ["a", "b"]
    a, b = ds.user_index("a"), ds.user_index("b")
    assert originals(ds, ds.sequence(a)) == ["11", "13", "10", "12", "14"]
    assert originals(ds, ds.sequence(b)) == ["32", "30", "31", "33", "10"]

    inp, tgt = ds.split(a, "train")
    assert originals(ds, inp) == ["11", "13", "10"] and tgt is None
    inp, tgt = ds.split(a, "valid")
    assert originals(ds, inp) == ["11", "13", "10"] and ds.item_ids[tgt - 1] == "12"
    inp, tgt = ds.split(a, "test")  # test input includes the validation item
    assert originals(ds, inp) == ["11", "13", "10", "12"] and ds.item_ids[tgt - 1] == "14"
    with pytest.raises(DataError, match="unknown split 'dev'"):
        ds.split(a, "dev")

    train = ds.train_sequences()
    assert [originals(ds, s) for s in train] == [["11", "13", "10"], ["32", "30", "31"]]


def test_sasrec_file_order_is_the_order(tmp_path):
    f = tmp_path / "s.txt"
    f.write_text("7 3\n7 1\n7 2\n8 2\n8 2\n8 1\n")
    ds = prepare_dataset(f, tmp_path / "out", min_user=3)
    assert ds.meta["format"] == "sasrec"
    assert [originals(ds, ds.sequence(u)) for u in range(2)] == [["3", "1", "2"], ["2", "2", "1"]]


def test_ids_remapped_in_ascending_original_order(tmp_path):
    rows = [("u", 10, 1), ("u", 2, 2), ("u", 100, 3), ("u", 2, 4), ("v", 9, 1), ("v", 10, 2), ("v", 2, 3)]
    ds = prepare_dataset(csv(tmp_path / "r.csv", rows), tmp_path / "out", min_user=3)
    assert ds.item_ids == ["2", "9", "10", "100"]  # numeric order, not "10" < "2"
    assert ds.n_items == 4 and ds.items.min() == 1 and ds.items.max() == 4
    assert [ds.item_index(x) for x in (2, "9", "10", 100)] == [1, 2, 3, 4]
    with pytest.raises(DataError, match="unknown item '55'"):
        ds.item_index("55")
    with pytest.raises(DataError, match="unknown user 'w'"):
        ds.user_index("w")


def test_string_ids_sort_as_strings_and_keep_their_spelling(tmp_path):
    rows = [("x", "007", 1), ("x", "b", 2), ("x", "10", 3), ("x", "a", 4)]
    ds = prepare_dataset(csv(tmp_path / "r.csv", rows), tmp_path / "out", min_user=3)
    assert ds.item_ids == ["007", "10", "a", "b"]
    rows = [(1, "+7", 1), (1, "07", 2), (1, 7, 3)]  # all integers, three spellings: three items
    ds = prepare_dataset(csv(tmp_path / "s.csv", rows), tmp_path / "out2", min_user=3)
    assert sorted(ds.item_ids) == ["+7", "07", "7"]


def test_integer_and_string_parsing_agree(tmp_path):
    # Integer-only files take a faster parser; float times force the string one. Same content, same result.
    rows = [(u, i, 10 * i + u) for u in (3, 20, 100) for i in (5, 40, 7, 300)]
    ints = prepare_dataset(csv(tmp_path / "a.csv", rows), tmp_path / "one", min_user=3)
    floats = prepare_dataset(csv(tmp_path / "b.csv", [(u, i, f"{t}.0") for u, i, t in rows]), tmp_path / "two",
                             min_user=3)
    assert ints.item_ids == ["5", "7", "40", "300"] and ints.user_ids == ["3", "20", "100"]
    assert floats.fingerprint == ints.fingerprint


def test_filters_reach_a_fixed_point(tmp_path):
    # min_item=2 drops item 9; user "c" then has 2 rows and goes; that leaves item 8 with one row,
    # so a second round drops 8, and user "b" falls to 2 rows and goes too.
    rows = [("a", 1, 1), ("a", 2, 2), ("a", 3, 3), ("a", 1, 4),
            ("b", 1, 1), ("b", 2, 2), ("b", 8, 3),
            ("c", 9, 1), ("c", 3, 2), ("c", 8, 3),
            ("d", 2, 1), ("d", 3, 2), ("d", 1, 3)]
    ds = prepare_dataset(csv(tmp_path / "r.csv", rows), tmp_path / "out", min_user=3, min_item=2)
    assert ds.user_ids == ["a", "d"]
    assert ds.item_ids == ["1", "2", "3"]
    assert (ds.lengths >= 3).all()
    assert (np.bincount(ds.items)[1:] >= 2).all()
    assert ds.meta["filters"] == {"min_user": 3, "min_item": 2, "mode": ds.meta["filters"]["mode"], "removed": {
        "read": {"interactions": 13, "users": 4, "items": 5},
        "min_item": {"interactions": 2, "users": 0, "items": 2},  # 9, then 8
        "min_user": {"interactions": 4, "users": 2, "items": 0},  # c, then b
        "rounds": 3,  # two that removed something, one that found nothing more to remove
    }}


def test_min_user_drops_short_users(tmp_path):
    rows = [("a", i, i) for i in range(5)] + [("b", i, i) for i in range(4)]
    ds = prepare_dataset(csv(tmp_path / "r.csv", rows), tmp_path / "out")  # default min_user=5
    assert ds.user_ids == ["a"] and ds.n_interactions == 5


def test_min_user_below_three_is_refused(tmp_path):
    with pytest.raises(DataError, match="min_user must be >= 3"):
        prepare_dataset(csv(tmp_path / "r.csv", TIES), tmp_path / "out", min_user=2)


def test_filters_leaving_nothing(tmp_path):
    with pytest.raises(DataError, match=r"ties\.csv: no interactions left after filtering \(min_user=50"):
        prepare_dataset(csv(tmp_path / "ties.csv", TIES), tmp_path / "out", min_user=50)
    assert not (tmp_path / "out").exists()


def test_item_popularity_counts_training_parts_only(tmp_path):
    ds = prepare_dataset(csv(tmp_path / "ties.csv", TIES), tmp_path / "out", min_user=3)
    pop = ds.item_popularity()
    assert pop.shape == (ds.n_items + 1,) and pop[0] == 0
    expected = {}
    for u in range(ds.n_users):
        for i in originals(ds, ds.sequence(u)[:-2]):
            expected[i] = expected.get(i, 0) + 1
    assert {ds.item_ids[i - 1]: int(c) for i, c in enumerate(pop) if i and c} == expected
    assert pop.sum() == ds.n_interactions - 2 * ds.n_users


def test_fingerprint_stable_and_content_sensitive(tmp_path):
    f = csv(tmp_path / "ties.csv", TIES)
    one = prepare_dataset(f, tmp_path / "one", min_user=3)
    two = prepare_dataset(f, tmp_path / "two", min_user=3)
    assert one.fingerprint == two.fingerprint
    assert one.fingerprint == compute_fingerprint(one.items, one.offsets, one.user_ids, one.item_ids)
    changed = [("a", 15, 9) if r == ("a", 14, 9) else r for r in TIES]
    three = prepare_dataset(csv(tmp_path / "changed.csv", changed), tmp_path / "three", min_user=3)
    assert three.fingerprint != one.fingerprint
    swapped = [("a", 12, 3) if r == ("a", 11, 3) else ("a", 11, 5) if r == ("a", 12, 5) else r for r in TIES]
    four = prepare_dataset(csv(tmp_path / "swapped.csv", swapped), tmp_path / "four", min_user=3)
    assert four.fingerprint != one.fingerprint  # same items and ids, different order


def test_row_order_with_distinct_times_does_not_matter(tmp_path):
    rows = [(u, i, 10 * i + u) for u in range(1, 4) for i in range(1, 6)]
    one = prepare_dataset(csv(tmp_path / "a.csv", rows), tmp_path / "one")
    two = prepare_dataset(csv(tmp_path / "b.csv", rows[::-1]), tmp_path / "two")
    assert one.fingerprint == two.fingerprint


def test_load_round_trip_is_read_only(tmp_path):
    ds = prepare_dataset(csv(tmp_path / "ties.csv", TIES), tmp_path / "out", min_user=3)
    again = PreparedDataset.load(tmp_path / "out")
    assert again.fingerprint == ds.fingerprint and again.user_ids == ds.user_ids
    np.testing.assert_array_equal(again.items, ds.items)
    with pytest.raises(ValueError):
        again.items[0] = 1


def test_load_detects_tampered_sequences(tmp_path):
    ds = prepare_dataset(csv(tmp_path / "ties.csv", TIES), tmp_path / "out", min_user=3)
    items = ds.items.copy()
    items[[0, 1]] = items[[1, 0]]
    save_file({"items": items, "offsets": ds.offsets.copy()}, str(tmp_path / "out" / "sequences.safetensors"))
    with pytest.raises(DataError, match=r"sequences\.safetensors: changed since the dataset was prepared"):
        PreparedDataset.load(tmp_path / "out")
    # Someone who also rewrites the file hash in meta.json is still caught by the fingerprint.
    meta_path = tmp_path / "out" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["files"]["sequences.safetensors"] = hashlib.sha256(
        (tmp_path / "out" / "sequences.safetensors").read_bytes()).hexdigest()
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DataError, match="does not match the fingerprint"):
        PreparedDataset.load(tmp_path / "out")


def test_load_refuses_non_dataset(tmp_path):
    with pytest.raises(DataError, match="not a prepared dataset directory"):
        PreparedDataset.load(tmp_path / "missing")
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match=r"meta\.json: missing"):
        PreparedDataset.load(tmp_path / "d")


def test_out_rules(tmp_path):
    f = csv(tmp_path / "ties.csv", TIES)
    out = tmp_path / "out"
    out.mkdir()  # an empty directory may be used
    ds = prepare_dataset(f, out, min_user=3)
    again = prepare_dataset(f, out, min_user=3)  # same content again: accepted, untouched
    assert again.fingerprint == ds.fingerprint
    with pytest.raises(DataError, match=r"out: already holds a different prepared dataset"):
        prepare_dataset(csv(tmp_path / "other.csv", TIES[:8]), out, min_user=3)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes").write_text("mine")
    with pytest.raises(DataError, match="busy: exists, is not empty and is not a prepared dataset"):
        prepare_dataset(f, busy, min_user=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "other.csv", "out", "ties.csv"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import models.data

    def broken_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(models.data.os, "rename", broken_rename)
    with pytest.raises(OSError):
        prepare_dataset(csv(tmp_path / "ties.csv", TIES), tmp_path / "out", min_user=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ties.csv"]


def test_progress_reports_stages(tmp_path):
    seen = []
    prepare_dataset(csv(tmp_path / "ties.csv", TIES), tmp_path / "out", min_user=3,
                    progress=lambda stage, frac: seen.append((stage, frac)))
    assert [s for s, f in seen if f == 1.0] == ["read", "filter", "write"]


def test_planted_dataset(tmp_path):
    ds = make_planted_dataset(tmp_path / "a")
    assert (ds.n_users, ds.n_items) == (200, 50)
    assert ds.item_ids == [str(i) for i in range(1, 51)]  # internal id == original id
    assert 8 <= ds.lengths.min() and ds.lengths.max() <= 30
    follows = [planted_next(int(x), 50) == int(y) for u in range(ds.n_users)
               for x, y in zip(ds.sequence(u)[:-1], ds.sequence(u)[1:])]
    assert 0.85 < np.mean(follows) < 0.97  # the rule holds, with some noise
    assert make_planted_dataset(tmp_path / "b").fingerprint == ds.fingerprint
    assert make_planted_dataset(tmp_path / "c", seed=1).fingerprint != ds.fingerprint


# --- real MovieLens -------------------------------------------------------------------------------
def test_ml100k_counts_titles_and_order(tmp_path):
    src = needs_data("ml-100k")
    ds = prepare_dataset(src, tmp_path / "out")
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (943, 1682, 100_000)
    assert ds.meta["format"] == "ml-100k"
    assert ds.titles["1"] == "Toy Story (1995)" and len(ds.titles) == 1682
    # User "1" rebuilt by hand from u.data: a stable sort by timestamp.
    rows = [line.split("\t") for line in (src / "u.data").read_text().splitlines()]
    mine = sorted((r for r in rows if r[0] == "1"), key=lambda r: int(r[3]))
    assert originals(ds, ds.sequence(ds.user_index("1"))) == [r[1] for r in mine]


def test_ml1m_counts_speed_and_order(tmp_path):
    src = needs_data("ml-1m")
    t0 = time.perf_counter()
    ds = prepare_dataset(src, tmp_path / "out")
    elapsed = time.perf_counter() - t0
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (6040, 3706, 1_000_209)
    assert elapsed < 10, f"ml-1m prepare took {elapsed:.1f}s"  # about 1.5 s on 2 idle cores
    assert ds.titles["1"] == "Toy Story (1995)"
    rows = [line.split("\t") for line in (src / "ml-1m.seq.tsv").read_text().splitlines()[1:20_000]]
    mine = sorted((r for r in rows if r[0] == "1"), key=lambda r: int(r[2]))
    assert originals(ds, ds.sequence(0)) == [r[1] for r in mine]
    t0 = time.perf_counter()
    loaded = PreparedDataset.load(tmp_path / "out")
    assert time.perf_counter() - t0 < 1.0  # flat arrays, no per-user objects
    assert loaded.fingerprint == ds.fingerprint


def test_ml1m_item_filter_matches_published_sasrec_counts(tmp_path):
    # SASRec/gSASRec's ml-1m drops items with < 5 ratings: 3,416 items, 999,611 interactions.
    ds = prepare_dataset(needs_data("ml-1m"), tmp_path / "out", min_item=5)
    assert (ds.n_users, ds.n_items, ds.n_interactions) == (6040, 3416, 999_611)
