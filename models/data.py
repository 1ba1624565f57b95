"""Prepared datasets (SPEC §2): per-user chronological item sequences in one verified directory.

Layout of a prepared directory (docs/architecture.md):
    sequences.safetensors  `items` int32 (all users' internal item ids, concatenated),
                           `offsets` int64 (n_users + 1; user u owns items[offsets[u]:offsets[u+1]])
    users.json             original user ids; index = internal user index (0-based)
    items.json             original item ids; internal item id i <-> items[i - 1] (0 is padding)
    titles.json            original item id -> title ({} when the source had none)
    meta.json              source, format, filters, counts, fingerprint, sha256 of each file

Choices (deterministic, so the same input always gives the same fingerprint):
- order: each user's rows are sorted by the time/order column with a stable sort, ties keep file order.
- filters: drop items with < min_item rows, then users with < min_user rows, and repeat both until
  nothing changes (a fixed point: every kept user and item meets its minimum).
- ids: users and items are numbered in ascending order of their original id — numerically when every
  id is an integer, else as strings — so row order in the file does not change the numbering.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from models.errors import DataError
from models.readers import Interactions, read_interactions, read_titles

Progress = Callable[[str, float], None] | None

LAYOUT = "recmerge-dataset/1"
SEQUENCES, USERS, ITEMS, TITLES, META = (
    "sequences.safetensors", "users.json", "items.json", "titles.json", "meta.json")
FILTER_MODE = "items then users, repeated to a fixed point"
SPLITS = ("train", "valid", "test")


def compute_fingerprint(items: np.ndarray, offsets: np.ndarray, user_ids: list[str], item_ids: list[str]) -> str:
    """sha256 over the sequence arrays and both id lists, each part length-prefixed so parts cannot blur."""
    h = hashlib.sha256(LAYOUT.encode() + b"\0")
    parts = (
        np.ascontiguousarray(items, dtype="<i4").tobytes(),
        np.ascontiguousarray(offsets, dtype="<i8").tobytes(),
        json.dumps(user_ids, ensure_ascii=False, separators=(",", ":")).encode(),
        json.dumps(item_ids, ensure_ascii=False, separators=(",", ":")).encode(),
    )
    for blob in parts:
        h.update(len(blob).to_bytes(8, "little"))
        h.update(blob)
    return h.hexdigest()


class PreparedDataset:
    """Flat arrays + offsets; a user's sequence is a slice made on demand, never a stored object."""

    def __init__(self, items: np.ndarray, offsets: np.ndarray, user_ids: list[str], item_ids: list[str],
                 titles: dict[str, str], meta: dict, path: Path | None = None):
        self.items = items  # (n_interactions,) int32, values in 1..n_items
        self.offsets = offsets  # (n_users + 1,) int64
        self.user_ids = user_ids
        self.item_ids = item_ids
        self.titles = titles
        self.meta = meta
        self.path = path
        self.fingerprint: str = meta["fingerprint"]
        self._user_index: dict[str, int] | None = None
        self._item_index: dict[str, int] | None = None

    # --- sizes -----------------------------------------------------------------------------------
    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_interactions(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)  # (n_users,)

    def __repr__(self) -> str:
        return (f"PreparedDataset({self.n_users} users, {self.n_items} items, {self.n_interactions} "
                f"interactions, fingerprint {self.fingerprint[:12]})")

    # --- sequences and splits --------------------------------------------------------------------
    def sequence(self, u: int) -> np.ndarray:
        if not 0 <= u < self.n_users:
            raise IndexError(f"user index {u} out of range 0..{self.n_users - 1}")
        return self.items[self.offsets[u] : self.offsets[u + 1]]

    def split(self, u: int, part: str) -> tuple[np.ndarray, int | None]:
        """Leave-one-out: train (seq[:-2], None), valid (seq[:-2], seq[-2]), test (seq[:-1], seq[-1])."""
        seq = self.sequence(u)
        if part == "train":
            return seq[:-2], None
        if part == "valid":
            return seq[:-2], int(seq[-2])
        if part == "test":
            return seq[:-1], int(seq[-1])
        raise DataError(f"unknown split {part!r}; known: {', '.join(SPLITS)}")

    def train_sequences(self) -> list[np.ndarray]:
        o = self.offsets
        return [self.items[o[u] : o[u + 1] - 2] for u in range(self.n_users)]

    def item_popularity(self) -> np.ndarray:
        """(n_items + 1,) interaction counts over the training parts only; index 0 (padding) is 0."""
        train = np.ones(len(self.items), dtype=bool)
        ends = self.offsets[1:]
        train[ends - 1] = False  # test targets
        train[ends - 2] = False  # validation targets
        return np.bincount(self.items[train], minlength=self.n_items + 1)

    # --- original ids ----------------------------------------------------------------------------
    def user_index(self, original_id) -> int:
        if self._user_index is None:
            self._user_index = {u: i for i, u in enumerate(self.user_ids)}
        try:
            return self._user_index[str(original_id)]
        except KeyError:
            raise DataError(f"unknown user {original_id!r} in dataset {self.fingerprint[:12]}") from None

    def item_index(self, original_id) -> int:
        """Internal item id (1..n_items) of an original item id."""
        if self._item_index is None:
            self._item_index = {it: i + 1 for i, it in enumerate(self.item_ids)}
        try:
            return self._item_index[str(original_id)]
        except KeyError:
            raise DataError(f"unknown item {original_id!r} in dataset {self.fingerprint[:12]}") from None

    # --- disk ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> PreparedDataset:
        """Read and verify a prepared directory: file hashes, structure, then the fingerprint."""
        path = Path(path)
        if not path.is_dir():
            raise DataError(f"{path}: not a prepared dataset directory")
        meta = _read_json(path / META)
        if not isinstance(meta, dict) or meta.get("layout") != LAYOUT or "fingerprint" not in meta:
            raise DataError(f"{path / META}: not a {LAYOUT} meta file")
        blobs = {}
        for name in (SEQUENCES, USERS, ITEMS, TITLES):
            f = path / name
            if not f.is_file():
                raise DataError(f"{f}: missing from the prepared dataset")
            blobs[name] = f.read_bytes()
            if hashlib.sha256(blobs[name]).hexdigest() != meta.get("files", {}).get(name):
                raise DataError(f"{f}: changed since the dataset was prepared (sha256 mismatch)")
        try:
            arrays = st_load(blobs[SEQUENCES])
            items, offsets = arrays["items"], arrays["offsets"]
        except Exception as e:  # safetensors raises its own error types on a corrupt file
            raise DataError(f"{path / SEQUENCES}: unreadable ({e})") from None
        user_ids = _parse_json(blobs[USERS], path / USERS)
        item_ids = _parse_json(blobs[ITEMS], path / ITEMS)
        titles = _parse_json(blobs[TITLES], path / TITLES)
        _check_structure(path, items, offsets, user_ids, item_ids)
        if compute_fingerprint(items, offsets, user_ids, item_ids) != meta["fingerprint"]:
            raise DataError(f"{path}: content does not match the fingerprint in {META}")
        items.flags.writeable = False  # shared by every consumer; nobody may edit a verified dataset
        offsets.flags.writeable = False
        return cls(items, offsets, user_ids, item_ids, titles, meta, path)


def _read_json(f: Path):
    if not f.is_file():
        raise DataError(f"{f}: missing, not a prepared dataset")
    return _parse_json(f.read_bytes(), f)


def _parse_json(blob: bytes, f: Path):
    try:
        return json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{f}: not valid JSON ({e})") from None


def _check_structure(path: Path, items, offsets, user_ids, item_ids) -> None:
    seq = path / SEQUENCES
    if items.dtype != np.int32 or items.ndim != 1 or offsets.dtype != np.int64 or offsets.ndim != 1:
        raise DataError(f"{seq}: expected 1-D int32 `items` and 1-D int64 `offsets`")
    if len(offsets) != len(user_ids) + 1 or offsets[0] != 0 or offsets[-1] != len(items):
        raise DataError(f"{seq}: offsets do not match {USERS} and the items array")
    if (np.diff(offsets) < 3).any():
        raise DataError(f"{seq}: a user has fewer than 3 items (leave-one-out needs 3)")
    if len(items) and (items.min() < 1 or items.max() > len(item_ids)):
        raise DataError(f"{seq}: item ids outside 1..{len(item_ids)}")


# --- preparing ------------------------------------------------------------------------------------
def _compact(values: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Dense ranks of non-negative ints below `size`, by a counting pass instead of a sort: (ranks, kept)."""
    present = np.zeros(size, dtype=bool)
    present[values] = True
    rank = np.cumsum(present) - 1
    return rank[values], np.flatnonzero(present)


def _factorize(col: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """(codes, labels) with labels in ascending original-id order: numeric if all ids are integers."""
    if col.dtype.kind in "iu":
        lo, hi = int(col.min()), int(col.max())
        if hi - lo <= 4 * len(col) + (1 << 20):  # ids dense enough to count rather than sort
            codes, kept = _compact(col - lo, hi - lo + 1)
            return codes, [str(int(x) + lo) for x in kept]
        uniq, inv = np.unique(col, return_inverse=True)
        return inv, [str(int(x)) for x in uniq]
    uniq, inv = np.unique(col, return_inverse=True)
    try:
        as_int = uniq.astype(np.int64)
        numeric = bool((as_int.astype(str) == uniq).all())  # "007" or "+7" must stay strings
    except (ValueError, OverflowError):
        numeric = False
    if not numeric:
        return inv, uniq.tolist()
    perm = np.argsort(as_int, kind="stable")
    rank = np.empty_like(perm)
    rank[perm] = np.arange(len(perm))
    return rank[inv], uniq[perm].tolist()


def filter_interactions(user: np.ndarray, item: np.ndarray, min_user: int, min_item: int,
                        removed: dict | None = None) -> np.ndarray:
    """Boolean mask of the rows kept: item filter, then user filter, repeated until stable.

    `removed`, when given, is filled with what each filter took over all rounds, so a user can see why
    their data shrank: {"min_item": {"interactions", "users", "items"}, "min_user": {...}, "rounds",
    "read": the counts before filtering}. A filter's users and items are those that had rows before it
    and none after (an item can vanish through the user filter, and a user through the item filter)."""
    keep = np.ones(len(user), dtype=bool)
    n_u, n_i = int(user.max()) + 1, int(item.max()) + 1
    took = {f: {"interactions": 0, "users": 0, "items": 0} for f in ("min_item", "min_user")}

    def account(name: str, before: np.ndarray, after: np.ndarray) -> None:
        t = took[name]
        t["interactions"] += int(before.sum() - after.sum())
        t["users"] += int(np.count_nonzero(np.bincount(user[before], minlength=n_u))
                          - np.count_nonzero(np.bincount(user[after], minlength=n_u)))
        t["items"] += int(np.count_nonzero(np.bincount(item[before], minlength=n_i))
                          - np.count_nonzero(np.bincount(item[after], minlength=n_i)))

    rounds = 0
    while True:
        rounds += 1
        by_item = keep & (np.bincount(item[keep], minlength=n_i)[item] >= min_item)
        new = by_item & (np.bincount(user[by_item], minlength=n_u)[user] >= min_user)
        if removed is not None:
            account("min_item", keep, by_item)
            account("min_user", by_item, new)
        if new.sum() == keep.sum():
            if removed is not None:
                # Codes are dense (_factorize), so every user and item code had a row before filtering.
                removed.update(took, rounds=rounds, read={"interactions": len(user), "users": n_u, "items": n_i})
            return new
        keep = new


def _check_filters(min_user: int, min_item: int) -> None:
    if min_user < 3:
        raise DataError(f"min_user must be >= 3 (leave-one-out needs 3 items per user), got {min_user}")
    if min_item < 0:
        raise DataError(f"min_item must be >= 0, got {min_item}")


def build_sequences(inter: Interactions, min_user: int = 5, min_item: int = 0, removed: dict | None = None):
    """Interactions -> (items int32, offsets int64, user_ids, item_ids) after filtering and remapping;
    `removed` as in filter_interactions."""
    _check_filters(min_user, min_item)
    user, user_labels = _factorize(inter.user)
    item, item_labels = _factorize(inter.item)
    keep = filter_interactions(user, item, min_user, min_item, removed)
    if not keep.any():
        raise DataError(f"{inter.path}: no interactions left after filtering "
                        f"(min_user={min_user}, min_item={min_item})")
    user, item = user[keep], item[keep]
    # Stable sort by order, then stable sort by user: per user chronological, ties in file order.
    idx = np.arange(len(user))
    if inter.order is not None:
        idx = np.argsort(inter.order[keep], kind="stable")
    idx = idx[np.argsort(user[idx], kind="stable")]
    user_new, kept_users = _compact(user, len(user_labels))
    item_new, kept_items = _compact(item, len(item_labels))
    items = (item_new[idx] + 1).astype(np.int32)
    offsets = np.zeros(len(kept_users) + 1, dtype=np.int64)
    np.cumsum(np.bincount(user_new, minlength=len(kept_users)), out=offsets[1:])
    return items, offsets, [user_labels[c] for c in kept_users], [item_labels[c] for c in kept_items]


def _resolve_source(source: str | os.PathLike, progress: Progress) -> Path:
    p = Path(source)
    if p.exists():
        return p
    if str(source) == "ml-100k":
        from models.download import fetch_ml100k

        return fetch_ml100k(progress=progress)
    raise DataError(f"{source}: no such file or directory")


def _existing_fingerprint(out: Path) -> str | None:
    """None when `out` is free to use; the fingerprint when it already holds a prepared dataset."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    if not any(out.iterdir()):
        return None
    meta = out / META
    try:
        fp = json.loads(meta.read_text())["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{out}: exists, is not empty and is not a prepared dataset") from None
    return fp


def prepare_dataset(source: str | os.PathLike, out: str | os.PathLike, fmt: str | None = None,
                    min_user: int = 5, min_item: int = 0, *, user_col: str | None = None,
                    item_col: str | None = None, order_col: str | None = None,
                    progress: Progress = None) -> PreparedDataset:
    """Read `source` (a file, a directory holding one, or `ml-100k`), filter, remap, write `out`.

    `out` is written atomically. If `out` already holds the same prepared content (same fingerprint)
    it is kept and returned; any other non-empty `out` is refused.
    """
    out = Path(out)
    report = progress or (lambda stage, fraction: None)
    _check_filters(min_user, min_item)
    _existing_fingerprint(out)  # fail before the work when `out` is clearly unusable
    path = _resolve_source(source, progress)
    report("read", 0.0)
    inter = read_interactions(path, fmt, user_col, item_col, order_col)
    titles_all = read_titles(inter.path)
    report("read", 1.0)
    report("filter", 0.0)
    removed: dict = {}
    items, offsets, user_ids, item_ids = build_sequences(inter, min_user, min_item, removed)
    report("filter", 1.0)
    fingerprint = compute_fingerprint(items, offsets, user_ids, item_ids)
    meta = {
        "layout": LAYOUT,
        "source": str(source),
        "file": str(inter.path.resolve()),
        "format": inter.fmt,
        "filters": {"min_user": min_user, "min_item": min_item, "mode": FILTER_MODE, "removed": removed},
        "counts": {"users": len(user_ids), "items": len(item_ids), "interactions": len(items)},
        "fingerprint": fingerprint,
    }
    titles = {i: titles_all[i] for i in item_ids if i in titles_all}
    report("write", 0.0)
    _write_atomic(out, items, offsets, user_ids, item_ids, titles, meta)
    report("write", 1.0)
    return PreparedDataset.load(out)


def _write_atomic(out: Path, items, offsets, user_ids, item_ids, titles, meta) -> None:
    existing = _existing_fingerprint(out)
    if existing is not None:
        if existing != meta["fingerprint"]:
            raise DataError(f"{out}: already holds a different prepared dataset (fingerprint {existing[:12]})")
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        blobs = {
            SEQUENCES: st_save({"items": items, "offsets": offsets}, metadata={"layout": LAYOUT}),
            USERS: json.dumps(user_ids, ensure_ascii=False).encode(),
            ITEMS: json.dumps(item_ids, ensure_ascii=False).encode(),
            TITLES: json.dumps(titles, ensure_ascii=False, indent=0).encode(),
        }
        meta = dict(meta, files={name: hashlib.sha256(b).hexdigest() for name, b in blobs.items()})
        blobs[META] = json.dumps(meta, indent=2).encode()
        for name, blob in blobs.items():
            (tmp / name).write_bytes(blob)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; a dataset directory is meant to be shared
        try:
            os.rename(tmp, out)  # atomic; replaces `out` only when it is an empty directory
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            # Another process finished the same `out` first: fine if it holds the same content.
            if _existing_fingerprint(out) != meta["fingerprint"]:
                raise DataError(f"{out}: already holds a different prepared dataset") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
