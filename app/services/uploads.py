"""Uploaded files: copied from the request's spool into our scratch directory in chunks and hashed on
the way (the size limit is enforced earlier, on the request body, by app.main.BodyLimit); and library
error messages scrubbed of the scratch paths before a client sees them."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20
UPLOAD_PREFIX = "upload-"
LOCK_NAME = ".lock"


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
    """Copy `src` to a private scratch directory; everything is removed when the block ends, whether it
    ends well, with an error or cancelled. The directory's lock, held until then, tells `sweep_uploads` in
    another process that this upload is alive; a process killed mid-upload drops its lock with it."""
    tmp_root.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=UPLOAD_PREFIX, dir=tmp_root))
    lock = os.open(workdir / LOCK_NAME, os.O_CREAT | os.O_WRONLY, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        name = safe_filename(filename)
        if name == LOCK_NAME:
            name = "upload"
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
        os.close(lock)


def sweep_uploads(tmp_root: Path, grace_s: float = 60.0) -> int:
    """Remove upload scratch directories no live process holds (their process was killed); returns how
    many. A directory without its lock file yet is left alone for `grace_s`: it may be being created."""
    removed = 0
    for workdir in tmp_root.glob(f"{UPLOAD_PREFIX}*"):
        try:
            fd = os.open(workdir / LOCK_NAME, os.O_RDONLY)
        except FileNotFoundError:
            try:
                stale = time.time() - workdir.stat().st_mtime > grace_s
            except FileNotFoundError:
                continue
            if stale:
                shutil.rmtree(workdir, ignore_errors=True)
                removed += 1
            continue
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(workdir, ignore_errors=True)
            removed += 1
        except BlockingIOError:
            pass  # a live upload
        finally:
            os.close(fd)
    return removed
