"""Uploaded files: copied from the request's spool into our scratch directory in chunks and hashed on
the way (the size limit is enforced earlier, on the request body, by app.main.BodyLimit); and library
error messages scrubbed of the scratch paths before a client sees them."""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20


@dataclass
class SavedUpload:
    path: Path
    filename: str  # the client's name for it, made safe; used in messages
    sha256: str
    size: int

    def scrub(self, message: str) -> str:
        """A library message names our scratch path; the client should read its own file name."""
        return message.replace(str(self.path), self.filename).replace(str(self.path.parent), "upload")


def safe_filename(name: str | None, default: str = "upload") -> str:
    # Only the last path component, and only harmless characters: the name feeds format detection.
    base = re.sub(r"[^A-Za-z0-9._-]", "_", (name or "").replace("\\", "/").rsplit("/", 1)[-1])[:100]
    return base.lstrip(".") or default


@contextmanager
def saved_upload(src: BinaryIO, filename: str | None, tmp_root: Path) -> Iterator[SavedUpload]:
    """Copy `src` to a private scratch directory; everything is removed when the block ends."""
    tmp_root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="upload-", dir=tmp_root))
    try:
        name = safe_filename(filename)
        dst = workdir / name
        h, size = hashlib.sha256(), 0
        with open(dst, "wb") as out:
            while chunk := src.read(CHUNK):
                size += len(chunk)
                h.update(chunk)
                out.write(chunk)
        yield SavedUpload(dst, name, h.hexdigest(), size)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
