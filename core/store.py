"""Content-addressed artifact store: files are named by their sha256, prepared datasets by fingerprint.

Writes are atomic — a reader sees a whole artifact or none — and idempotent: putting the same
content twice stores it once. `LocalStore` is a directory (the embedded default, a shared volume
under docker-compose); `S3Store` is a bucket for workers on several machines, which read through a
local cache directory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlparse

from models.checkpoint import file_sha256

CHUNK = 1 << 20


def _check_sha(sha256: str) -> str:
    # Keys become file names and object keys: refuse anything that is not a hex digest.
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return sha256


def _check_key(key: str) -> str:
    if not key or not all(c.isalnum() or c in "-_." for c in key) or key.startswith("."):
        raise ValueError(f"bad directory key: {key!r}")
    return key


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as f:
            shutil.copyfileobj(f, out, CHUNK)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_copytree(src: Path, dst: Path) -> None:
    """Copy a directory next to `dst`, then rename it into place; a concurrent twin wins harmlessly."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        try:
            os.rename(tmp, dst)
        except OSError:
            if not dst.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class LocalStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        (self.root / "dirs").mkdir(parents=True, exist_ok=True)

    def _obj(self, sha256: str) -> Path:
        sha256 = _check_sha(sha256)
        return self.root / "objects" / sha256[:2] / sha256

    def put_file(self, src: str | os.PathLike, sha256: str | None = None) -> str:
        """Store a copy of `src`; returns its sha256. The caller keeps (and removes) `src`."""
        sha256 = sha256 or file_sha256(src)
        dst = self._obj(sha256)
        if not dst.exists():
            _atomic_copy(Path(src), dst)
        return sha256

    def exists(self, sha256: str) -> bool:
        return self._obj(sha256).is_file()

    def path_for(self, sha256: str) -> Path:
        p = self._obj(sha256)
        if not p.is_file():
            raise KeyError(sha256)
        return p

    def open(self, sha256: str) -> BinaryIO:
        return open(self.path_for(sha256), "rb")

    def size(self, sha256: str) -> int:
        return self.path_for(sha256).stat().st_size

    def delete(self, sha256: str) -> None:
        self._obj(sha256).unlink(missing_ok=True)

    def objects(self) -> Iterator[str]:
        for p in (self.root / "objects").glob("*/*"):
            if not p.name.startswith("."):
                yield p.name

    def _dir(self, key: str) -> Path:
        return self.root / "dirs" / _check_key(key)

    def put_dir(self, key: str, src: str | os.PathLike) -> None:
        if not self.has_dir(key):
            _atomic_copytree(Path(src), self._dir(key))

    def has_dir(self, key: str) -> bool:
        return self._dir(key).is_dir()

    def get_dir(self, key: str) -> Path:
        d = self._dir(key)
        if not d.is_dir():
            raise KeyError(key)
        return d

    def delete_dir(self, key: str) -> None:
        shutil.rmtree(self._dir(key), ignore_errors=True)

    def dirs(self) -> Iterator[str]:
        for p in (self.root / "dirs").iterdir():
            if not p.name.startswith("."):
                yield p.name


class S3Store:
    """Objects at s3://bucket/prefix/objects/<sha256>, directories under prefix/dirs/<key>/.

    An S3 PUT is atomic per object, so a file is whole or absent. A directory is several objects:
    its `.complete` marker is written last, and only a directory with the marker exists.
    """

    MARKER = ".complete"

    def __init__(self, bucket: str, prefix: str, cache_dir: str | os.PathLike, endpoint_url: str | None = None):
        import boto3  # heavy, and only needed for this backend

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.cache = Path(cache_dir)
        self.s3 = boto3.client("s3", endpoint_url=endpoint_url)

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _head(self, key: str) -> dict | None:
        from botocore.exceptions import ClientError

        try:
            return self.s3.head_object(Bucket=self.bucket, Key=key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def _list(self, prefix: str) -> Iterator[str]:
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"]

    def put_file(self, src: str | os.PathLike, sha256: str | None = None) -> str:
        sha256 = _check_sha(sha256 or file_sha256(src))
        if not self.exists(sha256):
            self.s3.upload_file(str(src), self.bucket, self._key("objects", sha256))
        return sha256

    def exists(self, sha256: str) -> bool:
        return self._head(self._key("objects", _check_sha(sha256))) is not None

    def path_for(self, sha256: str) -> Path:
        """A local copy, downloaded once into the cache (atomically) and verified against its name."""
        p = self.cache / "objects" / _check_sha(sha256)
        if p.is_file():
            return p
        if not self.exists(sha256):
            raise KeyError(sha256)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{sha256}.", dir=p.parent)
        os.close(fd)
        try:
            self.s3.download_file(self.bucket, self._key("objects", sha256), tmp)
            if file_sha256(tmp) != sha256:
                raise OSError(f"object {sha256} in s3://{self.bucket} does not match its hash")
            os.replace(tmp, p)
        finally:
            Path(tmp).unlink(missing_ok=True)
        return p

    def open(self, sha256: str) -> BinaryIO:
        return open(self.path_for(sha256), "rb")

    def size(self, sha256: str) -> int:
        head = self._head(self._key("objects", _check_sha(sha256)))
        if head is None:
            raise KeyError(sha256)
        return int(head["ContentLength"])

    def delete(self, sha256: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self._key("objects", _check_sha(sha256)))
        (self.cache / "objects" / sha256).unlink(missing_ok=True)

    def objects(self) -> Iterator[str]:
        for key in self._list(self._key("objects") + "/"):
            yield key.rsplit("/", 1)[1]

    def put_dir(self, key: str, src: str | os.PathLike) -> None:
        if self.has_dir(key):
            return
        src = Path(src)
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            self.s3.upload_file(str(f), self.bucket, self._key("dirs", _check_key(key), f.relative_to(src).as_posix()))
        self.s3.put_object(Bucket=self.bucket, Key=self._key("dirs", key, self.MARKER), Body=b"")

    def has_dir(self, key: str) -> bool:
        return self._head(self._key("dirs", _check_key(key), self.MARKER)) is not None

    def get_dir(self, key: str) -> Path:
        local = self.cache / "dirs" / _check_key(key)
        if local.is_dir():
            return local
        if not self.has_dir(key):
            raise KeyError(key)
        base = self._key("dirs", key) + "/"
        self.cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.cache))
        try:
            for obj in self._list(base):
                rel = obj[len(base):]
                if rel == self.MARKER:
                    continue
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                self.s3.download_file(self.bucket, obj, str(staging / rel))
            _atomic_copytree(staging, local)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return local

    def delete_dir(self, key: str) -> None:
        for obj in list(self._list(self._key("dirs", _check_key(key)) + "/")):
            self.s3.delete_object(Bucket=self.bucket, Key=obj)
        shutil.rmtree(self.cache / "dirs" / key, ignore_errors=True)

    def dirs(self) -> Iterator[str]:
        base = self._key("dirs") + "/"
        for obj in self._list(base):
            key, _, rest = obj[len(base):].partition("/")
            if rest == self.MARKER:
                yield key


Store = LocalStore | S3Store


def open_store(url: str, cache_dir: str | os.PathLike, endpoint_url: str | None = None) -> Store:
    """`file:///abs/dir` (or a bare path) -> LocalStore; `s3://bucket/prefix` -> S3Store."""
    u = urlparse(url)
    if u.scheme in ("", "file"):
        return LocalStore(u.path if u.scheme else url)
    if u.scheme == "s3":
        if not u.netloc:
            raise ValueError(f"store URL {url!r} names no bucket")
        return S3Store(u.netloc, u.path, cache_dir, endpoint_url=endpoint_url)
    raise ValueError(f"store URL {url!r}: unknown scheme {u.scheme!r} (use file:// or s3://)")


def store_from_settings(settings) -> Store:
    return open_store(settings.STORE_URL, settings.cache_dir, settings.S3_ENDPOINT_URL)
