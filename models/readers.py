"""Interaction file readers (SPEC §2): one function per format, plus auto-detection.

Every reader returns the same `Interactions` columns: user and item ids (int64 when every id is a
canonically written integer, otherwise the exact strings of the file), and an order key (timestamp
or position; None means "file order"). Parsing is numpy's C `loadtxt`, never a Python object per row:
ml-1m's million rows must read in well under a second.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.errors import DataError

FORMATS = ("ml-100k", "ml-1m", "recbole", "sasrec", "csv")

# Column names recognised in CSV/TSV and RecBole headers, compared after `_norm` (lowercase, no type).
USER_COLS = ("user", "user_id", "userid", "uid")
ITEM_COLS = ("item", "item_id", "itemid", "movie_id", "movieid", "iid")
ORDER_COLS = ("timestamp", "time", "ts", "seq_idx", "order", "position")

# What a directory given as --source may hold, in the order we look for it.
_DIR_PATTERNS = ("u.data", "ratings.dat", "*.inter", "*.csv", "*.tsv", "*.txt")
_NOT_INTERACTIONS = {"u.item", "u.user", "u.genre", "u.info", "u.occupation", "movies.dat", "users.dat"}


@dataclass
class Interactions:
    user: np.ndarray  # (n,) int64 or str
    item: np.ndarray  # (n,) int64 or str
    order: np.ndarray | None  # (n,) int64/float64 sort key; None = the rows are already in order
    path: Path
    fmt: str


def _norm(name: str) -> str:
    # RecBole headers carry a type ("user_id:token"); quotes and case vary between CSV writers.
    return name.strip().strip('"').split(":")[0].strip().lower()


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected an interactions file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    with open(path, "rb") as f:
        head = f.read(64 * 1024)
    if _BINARY.search(head):  # its bytes would otherwise reach messages as "column names"
        raise DataError(f"{path}: not a text file (control bytes in its first {len(head)} bytes); "
                        "expected interactions as text")
    _first_line(path)  # only blank lines counts as empty too


# Control characters no interactions text holds (tab, newlines and form feed are allowed).
_BINARY = re.compile(rb"[\x00-\x08\x0b\x0e-\x1f\x7f]")


def _columns(header: list[str]) -> str:
    """Column names as a message shows them: a few, each clipped."""
    shown = ", ".join(h[:40] for h in header[:20])
    return shown + (f", … ({len(header)} columns)" if len(header) > 20 else "")


def _first_line(path: Path) -> str:
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            if line.strip():
                return line.rstrip("\r\n")
    raise DataError(f"{path}: file is empty")


def _loadtxt(source, path: Path, **kw) -> np.ndarray:
    """numpy's loadtxt with its errors turned into one-line DataErrors naming the file."""
    kw.setdefault("comments", None)  # a '#' inside a CSV field is data, not a comment
    kw.setdefault("ndmin", 2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "input contained no data": reported below
            table = np.loadtxt(source, **kw)
    except ValueError as e:
        raise DataError(f"{path}: {str(e).splitlines()[0].rstrip('.')}") from None
    if table.shape[0] == 0:
        raise DataError(f"{path}: no interactions in the file")
    return table


def read_ml100k(path: Path) -> Interactions:
    """GroupLens u.data: `user<TAB>item<TAB>rating<TAB>timestamp`, no header."""
    _check_file(path)
    t = _loadtxt(path, path, dtype=np.int64, delimiter="\t", usecols=(0, 1, 3))
    return Interactions(t[:, 0], t[:, 1], t[:, 2], path, "ml-100k")


def read_ml1m(path: Path) -> Interactions:
    """GroupLens ratings.dat: `user::item::rating::timestamp`, no header."""
    _check_file(path)
    # loadtxt takes single-character delimiters only; '::' never occurs inside these integer fields.
    text = path.read_text(encoding="latin-1").replace("::", "\t")
    t = _loadtxt(io.StringIO(text), path, dtype=np.int64, delimiter="\t", usecols=(0, 1, 3))
    return Interactions(t[:, 0], t[:, 1], t[:, 2], path, "ml-1m")


def read_sasrec(path: Path) -> Interactions:
    """SASRec-style `user item` lines, each user's items already in chronological order."""
    _check_file(path)
    t = _load_columns(path, usecols=(0, 1))
    return Interactions(t[:, 0], t[:, 1], None, path, "sasrec")


def _pick(header: list[str], wanted: str | None, candidates: tuple[str, ...], role: str, path: Path,
          option: str) -> int:
    if wanted is not None:
        if wanted in header:
            return header.index(wanted)
        normed = [_norm(h) for h in header]
        if _norm(wanted) in normed:
            return normed.index(_norm(wanted))
        raise DataError(f"{path}: no column {wanted!r} (columns: {_columns(header)})")
    normed = [_norm(h) for h in header]
    for c in candidates:
        if c in normed:
            return normed.index(c)
    raise DataError(f"{path}: no {role} column among {_columns(header)} (expected one of "
                    f"{', '.join(candidates)}; or pass {option})")


def _delimiter(header_line: str) -> str:
    for d in ("\t", ",", ";", "|"):
        if d in header_line:
            return d
    return " "


def read_table(path: Path, fmt: str = "csv", user_col: str | None = None, item_col: str | None = None,
               order_col: str | None = None) -> Interactions:
    """CSV/TSV (and RecBole .inter, a TSV with typed names) with a header naming the columns."""
    _check_file(path)
    line = _first_line(path)
    delim = _delimiter(line)
    header = [h.strip().strip('"') for h in (line.split(delim) if delim != " " else line.split())]
    iu = _pick(header, user_col, USER_COLS, "user", path, "--user-col")
    ii = _pick(header, item_col, ITEM_COLS, "item", path, "--item-col")
    io_ = _pick(header, order_col, ORDER_COLS, "time or order", path, "--order-col")
    if len({iu, ii, io_}) < 3:
        raise DataError(f"{path}: user, item and order columns must be three different columns")
    t = _load_columns(path, delimiter=None if delim == " " else delim, skiprows=1, usecols=(iu, ii, io_),
                      quotechar='"')
    order = t[:, 2] if t.dtype.kind == "i" else _numeric(t[:, 2], path, header[io_])
    return Interactions(t[:, 0], t[:, 1], order, path, fmt)


def _load_columns(path: Path, **kw) -> np.ndarray:
    """int64 table when every wanted column is a canonical integer (about 5x faster), else exact strings."""
    if _ints_keep_spelling(path):
        try:
            return _loadtxt(path, path, dtype=np.int64, encoding="utf-8-sig", **kw)
        except DataError:
            pass  # some column is not an integer: read the exact strings below
    return _loadtxt(path, path, dtype=str, encoding="utf-8-sig", **kw)


def _ints_keep_spelling(path: Path) -> bool:
    """False when a field may be an integer spelled non-canonically ("007", "+7"): int64 parsing would
    change that id's spelling, so such files take the exact string path. Vectorised over the raw bytes."""
    b = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    if (b == ord("+")).any():
        return False
    field_start = np.isin(b[:-2], np.frombuffer(b'\t,;| \n"-', dtype=np.uint8))
    zero_then_digit = (b[1:-1] == ord("0")) & (b[2:] >= ord("0")) & (b[2:] <= ord("9"))
    return not (field_start & zero_then_digit).any()


def _numeric(col: np.ndarray, path: Path, name: str) -> np.ndarray:
    # Integers stay int64 so large timestamps keep their exact order; floats are accepted too.
    try:
        return col.astype(np.int64)
    except ValueError:
        pass
    try:
        out = col.astype(np.float64)
    except ValueError:
        number = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")
        bad = next((v for v in col if not number.fullmatch(v)), "?")
        raise DataError(f"{path}: order column {name!r} is not numeric (value {str(bad)!r})") from None
    if not np.isfinite(out).all():
        raise DataError(f"{path}: order column {name!r} has NaN or infinite values")
    return out


def _looks_numeric(field: str) -> bool:
    return re.fullmatch(r"[-+]?\d+(\.\d*)?", field.strip()) is not None


def detect_format(path: Path) -> str:
    """Guess the format from the file name, then from its first line."""
    _check_file(path)
    if path.name == "u.data":
        return "ml-100k"
    if path.name == "ratings.dat":
        return "ml-1m"
    if path.suffix == ".inter":
        return "recbole"
    line = _first_line(path)
    if "::" in line:
        return "ml-1m"
    fields = line.split()
    if not all(_looks_numeric(f) for f in fields):
        return "recbole" if re.search(r":(token|float)", line) else "csv"
    if len(fields) == 2:
        return "sasrec"
    if len(fields) == 4 and line.count("\t") == 3:
        return "ml-100k"
    raise DataError(f"{path}: cannot detect the format from its first line {line[:60]!r}; "
                    f"pass --format ({', '.join(FORMATS)})")


def find_interactions_file(directory: Path) -> Path:
    """The one interactions file in a directory (e.g. an unpacked ml-100k holds u.data + u.item)."""
    for pattern in _DIR_PATTERNS:
        found = sorted(p for p in directory.glob(pattern) if p.is_file() and p.name not in _NOT_INTERACTIONS)
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise DataError(f"{directory}: several interaction files ({names}); pass one of them as --source")
    raise DataError(f"{directory}: no interactions file found (looked for {', '.join(_DIR_PATTERNS)})")


def read_interactions(path: Path, fmt: str | None = None, user_col: str | None = None,
                      item_col: str | None = None, order_col: str | None = None) -> Interactions:
    """Read any supported file; `fmt` overrides detection, the column options apply to csv/recbole."""
    path = Path(path)
    if path.is_dir():
        path = find_interactions_file(path)
    if fmt is None:
        fmt = detect_format(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if fmt in ("csv", "recbole"):
        return read_table(path, fmt, user_col, item_col, order_col)
    if user_col or item_col or order_col:
        raise DataError(f"--user-col/--item-col/--order-col apply to csv and recbole files, not {fmt}")
    return {"ml-100k": read_ml100k, "ml-1m": read_ml1m, "sasrec": read_sasrec}[fmt](path)


def read_titles(interactions_path: Path) -> dict[str, str]:
    """Item titles from a file beside the interactions (u.item, movies.dat, <stem>.item); {} if none."""
    folder = interactions_path.parent
    if (folder / "u.item").is_file():
        return _titles_split(folder / "u.item", "|")
    if (folder / "movies.dat").is_file():
        return _titles_split(folder / "movies.dat", "::")
    atomic = interactions_path.with_suffix(".item")
    if interactions_path.suffix == ".inter" and atomic.is_file():
        return _titles_atomic(atomic)
    return {}


def _titles_split(path: Path, sep: str) -> dict[str, str]:
    # GroupLens files are latin-1 ("Misérables"); decoding them as UTF-8 fails.
    titles = {}
    for line in path.read_text(encoding="latin-1").splitlines():
        parts = line.split(sep)
        if len(parts) >= 2 and parts[0].strip():
            titles[parts[0].strip()] = parts[1].strip()
    return titles


def _titles_atomic(path: Path) -> dict[str, str]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if not lines:
        return {}
    header = [_norm(h) for h in lines[0].split("\t")]
    try:
        iid = next(i for i, h in enumerate(header) if h in ITEM_COLS)
        ttl = next(i for i, h in enumerate(header) if h in ("movie_title", "title", "name"))
    except StopIteration:
        return {}
    titles = {}
    for line in lines[1:]:
        parts = line.split("\t")
        if len(parts) > max(iid, ttl):
            titles[parts[iid].strip()] = parts[ttl].strip()
    return titles
