"""Fetching MovieLens-100k on a user's machine (SPEC §2): GroupLens first, the recbole wheel second.

The recbole==1.2.1 wheel ships the same 100,000 ratings as an atomic `.inter` file. It is fetched with
`python -m pip download`, so it comes through whatever index, mirror, proxy and certificates the user's
pip is configured for: a machine that reaches only its package registry still gets the data. Files
land in a cache directory (`$XDG_CACHE_HOME/recmerge/ml-100k`), written to a temporary directory and
renamed, so an interrupted download never leaves a half-written cache behind.

    RECMERGE_ML100K_URL       the GroupLens zip (tests point it at a dead port)
    RECMERGE_DOWNLOAD_TIMEOUT seconds GroupLens gets to answer before pip is asked
    RECMERGE_PIP_ARGS         extra `pip download` arguments, e.g. "--no-index --find-links /wheels"
"""

from __future__ import annotations

import http.client
import io
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from models.errors import DataError

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
WHEEL_REQUIREMENT = "recbole==1.2.1"
WHEEL_DIR = "recbole/dataset_example/ml-100k/"
# Short: where GroupLens is blocked the connection may hang rather than fail, and pip is the next try.
TIMEOUT_S = 8.0
PIP_TIMEOUT_S = 600.0  # pip applies its own per-request timeout; this only stops a wedged pip
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


def pip_download(requirement: str, dest: Path, extra_args: list[str] | None = None) -> Path:
    """The wheel of `requirement`, fetched by this interpreter's pip into `dest`. Binary only: building
    an sdist would run its code and need its build dependencies."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--no-input", "-d", str(dest), *(extra_args or []), requirement]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise DataError(f"pip download {requirement}: no answer in {PIP_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "")
        raise DataError(f"pip download {requirement} failed (exit {done.returncode}): {why or 'no output'}")
    name = requirement.split("==")[0].replace("-", "_").lower()
    wheels = sorted(p for p in dest.glob("*.whl") if p.name.lower().startswith(name + "-"))
    if not wheels:
        raise DataError(f"pip download {requirement}: no wheel appeared in {dest}")
    return wheels[-1]


def _from_wheel(requirement: str, progress) -> dict[str, bytes]:
    extra = shlex.split(os.environ.get("RECMERGE_PIP_ARGS", ""))
    with tempfile.TemporaryDirectory(prefix="recmerge-pip-") as tmp:
        if progress:
            progress("download", 0.0)
        wheel = pip_download(requirement, Path(tmp), extra)
        with zipfile.ZipFile(wheel) as zf:
            data = _member(zf, WHEEL_DIR + "ml-100k.inter")
            titles = _member(zf, WHEEL_DIR + "ml-100k.item")
        if progress:
            progress("download", 1.0)
    if data is None:
        raise DataError(f"{wheel.name}: the wheel holds no {WHEEL_DIR}ml-100k.inter")
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
        ("pip download", WHEEL_REQUIREMENT, _from_wheel),
    ]
    failures = []
    for name, where, fetch in sources:
        try:
            files = fetch(where, progress)
            break
        except (OSError, ValueError, http.client.HTTPException, zipfile.BadZipFile) as e:
            # URLError, HTTPError, timeouts are OSErrors; DataError and bad URLs are ValueErrors.
            failures.append(f"{name} ({where}): {_why(e)}")
    else:
        raise DataError("could not download ml-100k: " + "; ".join(failures)
                        + "; download it yourself and pass the directory holding u.data as --source")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".ml-100k.", suffix=".tmp", dir=target.parent))
    try:
        for fname, blob in files.items():
            (tmp / fname).write_bytes(blob)
        (tmp / "ORIGIN").write_text(f"{name} {where}\n")
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # another process filling the cache at the same time is fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
