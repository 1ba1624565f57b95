"""pip pointed at a local directory instead of any network index, for tests of the ml-100k fallback.

`PIP_CONFIG_FILE=os.devnull` keeps the machine's pip.conf (its index, find-links, constraints) out, so
what pip sees is exactly the directory the test built."""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from pathlib import Path

NAME, VERSION = "recbole", "1.2.1"
WHEEL = f"{NAME}-{VERSION}-py3-none-any.whl"


def _record_line(name: str, blob: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(blob).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(blob)}"


def build_wheel(directory: Path, members: dict[str, bytes]) -> Path:
    """A minimal but valid recbole-1.2.1 wheel holding `members` (pip reads its METADATA and RECORD)."""
    info = f"{NAME}-{VERSION}.dist-info"
    files = dict(members)
    files[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n".encode()
    files[f"{info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: recmerge-tests\nRoot-Is-Purelib: true\n"
                              b"Tag: py3-none-any\n")
    record = [_record_line(n, b) for n, b in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / WHEEL
    with zipfile.ZipFile(path, "w") as zf:
        for n, b in files.items():
            zf.writestr(n, b)
    return path


def simple_index(root: Path, wheel: Path) -> str:
    """A PEP 503 index in `root` listing `wheel`; returns its file:// URL."""
    project = root / "simple" / NAME
    project.mkdir(parents=True, exist_ok=True)
    (project / wheel.name).write_bytes(wheel.read_bytes())
    (project / "index.html").write_text(f'<html><body><a href="{wheel.name}">{wheel.name}</a></body></html>\n')
    return (root / "simple").as_uri()


def pip_env(tmp: Path, index_url: str | None) -> dict[str, str]:
    """Environment for a pip that reads only `index_url` (None: no index at all, an empty find-links)."""
    empty = tmp / "no-wheels"
    empty.mkdir(parents=True, exist_ok=True)
    env = {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": str(empty), "PIP_EXTRA_INDEX_URL": "",
           "PIP_NO_CACHE_DIR": "1"}
    if index_url is None:
        env["PIP_NO_INDEX"] = "1"
    else:
        env["PIP_INDEX_URL"] = index_url
    return env
