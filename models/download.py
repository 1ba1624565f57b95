"""Fetching MovieLens-100k on a user's machine (SPEC §2): GroupLens first, the recbole wheel second.

The recbole==1.2.1 wheel on PyPI ships the same 100,000 ratings as an atomic `.inter` file, so a
machine that reaches only the package index can still get the data. Files land in a cache
directory (`$XDG_CACHE_HOME/recmerge/ml-100k`), written to a temporary directory and renamed,
so an interrupted download never leaves a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from models.errors import DataError

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
PYPI_URL = "https://pypi.org/pypi/recbole/1.2.1/json"
WHEEL_DIR = "recbole/dataset_example/ml-100k/"
TIMEOUT_S = 15.0  # a blocked network should fail in seconds, not hang the CLI
MAX_BYTES = 200 * 1024 * 1024  # neither archive is near this; a bigger answer is not what we asked for


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "recmerge"


def _timeout() -> float:
    return float(os.environ.get("RECMERGE_DOWNLOAD_TIMEOUT", TIMEOUT_S))


def _get(url: str, progress: Callable[[str, float], None] | None = None) -> bytes:
    req = urllib.request.Request(url, headers={"User-Agent": "recmerge/0.1"})
    with urllib.request.urlopen(req, timeout=_timeout()) as resp:
        total = int(resp.headers.get("Content-Length") or 0)
        buf = io.BytesIO()
        while chunk := resp.read(1 << 16):
            buf.write(chunk)
            if buf.tell() > MAX_BYTES:
                raise DataError(f"{url}: answer larger than {MAX_BYTES} bytes")
            if progress and total:
                progress("download", min(buf.tell() / total, 1.0))
        return buf.getvalue()


def _member(zf: zipfile.ZipFile, suffix: str) -> bytes | None:
    # Read named members only (never extractall): a hostile archive cannot write outside the cache.
    names = [n for n in zf.namelist() if n.endswith(suffix)]
    return zf.read(min(names, key=len)) if names else None


def _from_grouplens(url: str, progress) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(_get(url, progress))) as zf:
        data, titles = _member(zf, "u.data"), _member(zf, "u.item")
    if data is None:
        raise DataError(f"{url}: the archive holds no u.data")
    return {"u.data": data, **({"u.item": titles} if titles is not None else {})}


def _from_wheel(index_url: str, progress) -> dict[str, bytes]:
    try:
        release = json.loads(_get(index_url))
        wheel = next(f for f in release["urls"] if f.get("packagetype") == "bdist_wheel")
    except (ValueError, KeyError, TypeError, StopIteration):
        raise DataError(f"{index_url}: not a PyPI release description with a wheel") from None
    blob = _get(wheel["url"], progress)
    expected = wheel.get("digests", {}).get("sha256")
    if expected and hashlib.sha256(blob).hexdigest() != expected:
        raise DataError(f"{wheel['url']}: sha256 does not match the index")
    with zipfile.ZipFile(io.BytesIO(blob)) as zf:
        data = _member(zf, WHEEL_DIR + "ml-100k.inter")
        titles = _member(zf, WHEEL_DIR + "ml-100k.item")
    if data is None:
        raise DataError(f"{wheel['url']}: the wheel holds no {WHEEL_DIR}ml-100k.inter")
    return {"ml-100k.inter": data, **({"ml-100k.item": titles} if titles is not None else {})}


def _why(e: Exception) -> str:
    # URLError's str() wraps the reason in "<urlopen error ...>"; HTTPError's str() is already clear.
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        return str(e.reason)
    return str(e)


def fetch_ml100k(progress: Callable[[str, float], None] | None = None) -> Path:
    """Directory holding ml-100k (u.data + u.item, or ml-100k.inter + .item); downloads when not cached."""
    target = cache_dir() / "ml-100k"
    if (target / "u.data").is_file() or (target / "ml-100k.inter").is_file():
        return target
    sources = [
        ("GroupLens", os.environ.get("RECMERGE_ML100K_URL", GROUPLENS_URL), _from_grouplens),
        ("PyPI recbole wheel", os.environ.get("RECMERGE_PYPI_URL", PYPI_URL), _from_wheel),
    ]
    failures = []
    for name, url, fetch in sources:
        try:
            files = fetch(url, progress)
            break
        except (OSError, ValueError, http.client.HTTPException, zipfile.BadZipFile) as e:
            # URLError, HTTPError, timeouts are OSErrors; DataError and bad URLs are ValueErrors.
            failures.append(f"{name} ({url}): {_why(e)}")
    else:
        raise DataError("could not download ml-100k: " + "; ".join(failures)
                        + "; download it yourself and pass the directory holding u.data as --source")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ml-100k.", suffix=".tmp", dir=target.parent))
    try:
        for fname, blob in files.items():
            (tmp / fname).write_bytes(blob)
        (tmp / "ORIGIN").write_text(f"{name} {url}\n")
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # another process filling the cache at the same time is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
