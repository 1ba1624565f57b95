"""Streaming safetensors IO: read one tensor, or one block of its rows, at a time; write a file tensor by
tensor into a temporary file that is renamed only when every byte is in.

Why not `safe_open`: it mmaps the file, and every page a merge touches then counts in the process's RSS
(a plain safe_open loop over 3 x 1 GB inputs peaked at 3.6 GB). Reading with pread into a fresh buffer
keeps RSS at what the merge itself holds; the page cache is told when we are done with a range.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import struct
import tempfile
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from merging.libc import libc_function
from models.checkpoint import check_safetensors_file
from models.errors import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class _BackgroundSha256:
    """sha256 fed on a worker thread, so hashing what a merge writes overlaps the merge's own arithmetic
    (hashlib releases the GIL on large updates). Updates run in the order given: all users share one
    worker. At most `_MAX_PENDING` copies of blocks wait per hash, which bounds the memory."""

    _MAX_PENDING = 8
    _executor: ThreadPoolExecutor | None = None
    _lock = threading.Lock()

    def __init__(self):
        self._sha = hashlib.sha256()
        self._pending: deque[Future] = deque()

    @classmethod
    def _worker(cls) -> ThreadPoolExecutor:
        with cls._lock:
            if cls._executor is None:
                cls._executor = ThreadPoolExecutor(1, thread_name_prefix="recmerge-sha256")
            return cls._executor

    def update(self, data) -> None:
        while len(self._pending) >= self._MAX_PENDING:
            self._pending.popleft().result()
        self._pending.append(self._worker().submit(self._sha.update, bytes(data)))  # the caller may reuse data

    def hexdigest(self) -> str:
        while self._pending:
            self._pending.popleft().result()
        return self._sha.hexdigest()


_sync_file_range = libc_function("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to start writing a range of dirty pages to disk, without waiting for it: a file
    written this way is mostly on disk by the time it is fsynced. Measured on a 1 GB merge output: the
    final fsync alone took ~2 s, the same time the merge itself spent computing."""
    if _sync_file_range is not None and nbytes > 0:
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # advisory: a failure only costs time


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute position of the first byte in the file
    nbytes: int

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0


def _parse_header(path: Path, fd: int) -> tuple[dict[str, str], dict[str, TensorInfo]]:
    (n,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    raw = json.loads(os.pread(fd, n, 8))  # check_safetensors_file already proved this is JSON
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    data_start, size = 8 + n, os.fstat(fd).st_size
    meta = raw.pop("__metadata__", None) or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{path}: safetensors metadata must map strings to strings")
    tensors = []
    for name, entry in raw.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            lo, hi = (int(o) for o in entry["data_offsets"])
        except KeyError as e:
            raise CheckpointError(f"{path}: tensor {name!r} has an unsupported or missing {e}") from None
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or hi - lo != nbytes or lo < 0 or data_start + hi > size:
            raise CheckpointError(f"{path}: tensor {name!r}: offsets {lo}..{hi} do not fit dtype "
                                  f"{entry['dtype']} and shape {list(shape)} inside the file")
        tensors.append(TensorInfo(name, dtype, shape, data_start + lo, nbytes))
    tensors.sort(key=lambda t: t.offset)
    return meta, {t.name: t for t in tensors}


# Page-cache folios are at most one PMD (2 MiB on x86-64, arm64 with 4K pages) and aligned to their size,
# so a DONTNEED range with both ends on this boundary covers every folio it touches.
DROP_ALIGN = 2 << 20


class SafetensorsReader:
    """Header parsed once; `read` returns a tensor that owns its memory (nothing is mapped)."""

    def __init__(self, path: str | os.PathLike, drop_cache: bool = False):
        """`drop_cache`: drop each range from the page cache once read (set it for a file's last pass)."""
        self.path = Path(path)
        check_safetensors_file(self.path)  # refuses pickles, truncation and non-safetensors first
        self.drop_cache = drop_cache
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self.metadata, self.tensors = _parse_header(self.path, self._fd)
        except BaseException:
            os.close(self._fd)
            raise
        self.bytes_read = 0
        self._sha = None  # while hash_as_read is on: sha256 of bytes 0.._hashed_to of the file
        self._hashed_to = 0
        self._dropped_to = 0  # with drop_cache: pages before this were dropped from the page cache
        # Read ahead by the kernel alone, with a window twice its default for this file. An explicit
        # WILLNEED per block was measured to cost 3x the system time cold: it fills the cache with single
        # pages and breaks the kernel's own readahead of large folios (docs/results/merge_memory.md, run 7).
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def hash_as_read(self, order: list[str]) -> bool:
        """From now on, feed every byte `read` returns to a sha256 of the whole file, so a merge that reads
        the file front to back gets its digest without a second pass. The hashing runs in the thread that
        calls `read` (the merge reads on its own thread, beside the arithmetic). Bytes no read covers (the header,
        padding, gaps, a tail) are read and hashed when the reads pass them or in `finish_hash`.
        False, and nothing is hashed, when reading the tensors in `order` would not go front to back."""
        end = 0
        for name in order:
            info = self.tensors[name]
            if info.nbytes:  # an empty tensor is never read
                if info.offset < end:
                    return False
                end = info.offset + info.nbytes
        self._sha, self._hashed_to = hashlib.sha256(), 0
        return True

    def finish_hash(self) -> str | None:
        """The file's sha256 (hashing what is left after the last read), or None when hashing was not on or
        some read went backwards since `hash_as_read`: hash the file separately then."""
        if self._sha is None:
            return None
        self._hash_upto(None)
        digest, self._sha = self._sha.hexdigest(), None
        return digest

    def _hash_upto(self, end: int | None) -> None:
        """Read and hash the bytes from where hashing stopped up to `end` (the end of the file for None)."""
        while end is None or self._hashed_to < end:
            want = 1 << 20 if end is None else min(1 << 20, end - self._hashed_to)
            data = os.pread(self._fd, want, self._hashed_to)
            if not data:
                if end is not None:
                    raise CheckpointError(f"{self.path}: file ended at byte {self._hashed_to}, expected {end}")
                return
            self._sha.update(data)
            self._hashed_to += len(data)
            self.bytes_read += len(data)

    def _hash_read(self, at: int, data) -> None:
        if at < self._hashed_to:  # out of file order: this hash can no longer be right
            self._sha = None
            return
        self._hash_upto(at)
        self._sha.update(data)
        self._hashed_to = at + data.nbytes

    def _drop_behind(self, start: int, end: int) -> None:
        """Drop the pages of [start, end), just read, from the page cache: a merge reads each byte once, and
        keeping it cached only evicts pages someone else needs. Both ends of the range fall on DROP_ALIGN,
        and a read that follows the last one starts its range where that one's ended: the kernel drops only
        whole folios, and a folio cut by every range would stay cached for good."""
        follows = 0 <= start - self._dropped_to < DROP_ALIGN
        lo = self._dropped_to if follows else start // DROP_ALIGN * DROP_ALIGN
        hi = end // DROP_ALIGN * DROP_ALIGN
        if hi > lo:
            os.posix_fadvise(self._fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
        self._dropped_to = max(self._dropped_to, hi)

    @property
    def names(self) -> list[str]:  # in file order, so a pass over them reads the file sequentially
        return list(self.tensors)

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows start:stop of tensor `name` (the whole tensor by default; a 0-d tensor has one 'row')."""
        info = self.tensors[name]
        stop = info.rows if stop is None else stop
        n = (stop - start) * info.row_bytes
        buf = torch.empty(n, dtype=torch.uint8)
        if n:
            view, pos, at = memoryview(buf.numpy()), 0, info.offset + start * info.row_bytes
            while pos < n:
                got = os.preadv(self._fd, [view[pos:]], at + pos)
                if got == 0:
                    raise CheckpointError(f"{self.path}: file ended inside tensor {name!r}")
                pos += got
            if self._sha is not None:
                self._hash_read(at, view)
            if self.drop_cache:
                self._drop_behind(at, at + n)
        self.bytes_read += n
        shape = (stop - start, *info.shape[1:]) if info.shape else ()
        return buf.view(info.dtype).view(shape)

    def close(self) -> None:
        if self._fd >= 0:
            if self.drop_cache:  # the tail after the last whole DROP_ALIGN range (length 0: to the end)
                os.posix_fadvise(self._fd, self._dropped_to, 0, os.POSIX_FADV_DONTNEED)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _open_unnamed(directory: Path) -> int | None:
    """A read-write descriptor of a new file in `directory` that has no name (O_TMPFILE), or None where
    the platform or file system has none, or /proc (needed to link it in later) is missing."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(directory, flag | os.O_RDWR, 0o600)
    except OSError:  # EOPNOTSUPP, EISDIR (kernels before 3.11), ...
        return None


def _fresh_name(path: Path) -> str:
    return str(path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.{os.urandom(4).hex()}.tmp"))


def row_blocks(info: TensorInfo, chunk_bytes: int) -> list[tuple[int, int]]:
    """Row ranges of about chunk_bytes each (at least one row) that cover the tensor; 0-d is one block."""
    if not info.shape or info.shape[0] == 0:
        return [(0, info.rows)]
    step = max(1, chunk_bytes // max(info.row_bytes, 1))
    return [(i, min(i + step, info.rows)) for i in range(0, info.rows, step)]


def header_bytes(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and JSON header of a file holding `entries` back to back, metadata in its given order."""
    header, off = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header so tensor data starts 8-aligned
    return struct.pack("<Q", len(blob)) + blob


class SafetensorsWriter:
    """Writes a safetensors file whose header is known up front, then tensors in header order (each may
    arrive in several row blocks). Nothing appears at `path` until `commit`; a writer left without a
    commit (an exception, a failed check) leaves nothing behind.

    Where the file system allows (Linux O_TMPFILE), the data goes to a file with no name at all until
    `commit` links it in, so a merge refused halfway (NaN in the last block of an input, a digest that
    does not match) never had a file in the directory; elsewhere to a hidden temporary file that is
    renamed or deleted.

    With `provisional=True` the metadata is a stand-in of the final length (values learnt only while the
    tensors stream, such as the inputs' sha256): `rewrite_header` must put the real one in before `commit`,
    which then reads the file back once to hash it.

    Every `writeback_bytes` written, the kernel is asked to start writing them out, so the disk works
    while the caller computes the next tensors instead of all at once in `commit`'s fsync."""

    writeback_bytes = 32 << 20

    def __init__(self, path: str | os.PathLike, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str], provisional: bool = False):
        self.path = Path(path)
        self._entries = list(entries)
        self._plan = [(name, dtype, math.prod(shape) * dtype.itemsize) for name, dtype, shape in self._entries]
        head = header_bytes(self._entries, metadata)
        self._head_len = len(head)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_unnamed(self.path.parent)
        self.tmp: str | None = None  # the temporary file's name, where the data has one before commit
        if fd is None:
            fd, self.tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self.unnamed = self.tmp is None
        self._f = os.fdopen(fd, "wb")
        # A running hash would cover the stand-in header, which the final file does not hold. The running
        # one is fed on the sha256 worker thread, beside the merge arithmetic.
        self._sha = None if provisional else _BackgroundSha256()
        self._provisional = provisional
        self._index, self._left = 0, self._plan[0][2] if self._plan else 0
        self._written = self._queued = 0  # bytes appended; bytes handed to start_writeback
        self._put(head)
        self.sha256: str | None = None
        self.bytes_reread = 0  # what commit read back to hash a rewritten file

    def _put(self, data) -> None:
        self._f.write(data)
        if self._sha is not None:
            self._sha.update(data)
        self._written += len(data)  # bytes, or a flat uint8 view
        if self._written - self._queued >= self.writeback_bytes:
            self._f.flush()
            start_writeback(self._f.fileno(), self._queued, self._written - self._queued)
            self._queued = self._written

    def rewrite_header(self, metadata: dict[str, str]) -> None:
        """Replace the provisional metadata in the header already written; it must serialise to the same length,
        since the tensor data behind it stays where it is."""
        if not self._provisional:
            raise RuntimeError("writer: rewrite_header needs a writer opened with provisional=True")
        head = header_bytes(self._entries, metadata)
        if len(head) != self._head_len:
            raise RuntimeError(f"writer: the new header is {len(head)} bytes, the provisional one {self._head_len}")
        self._f.flush()
        os.pwrite(self._f.fileno(), head, 0)  # pwrite leaves the append position alone
        self._provisional = False

    def _hash_back(self) -> str:
        sha, fd, buf = hashlib.sha256(), self._f.fileno(), bytearray(1 << 20)
        view = memoryview(buf)
        while got := os.preadv(fd, [view], self.bytes_reread):
            sha.update(view[:got])
            self.bytes_reread += got
        return sha.hexdigest()

    def write(self, name: str, block: torch.Tensor) -> None:
        """Append `block` (the whole tensor or its next rows) to tensor `name`, which must be the current one."""
        while self._index < len(self._plan) and self._left == 0 and self._plan[self._index][0] != name:
            self._advance()  # tensors with no bytes need no write
        if self._index >= len(self._plan) or self._plan[self._index][0] != name:
            expected = self._plan[self._index][0] if self._index < len(self._plan) else "nothing"
            raise RuntimeError(f"writer: got tensor {name!r}, expected {expected!r}")
        if block.dtype != self._plan[self._index][1]:
            raise RuntimeError(f"writer: tensor {name!r} has dtype {block.dtype}, header says "
                               f"{self._plan[self._index][1]}")
        data = block.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        if data.nbytes > self._left:
            raise RuntimeError(f"writer: tensor {name!r} got more bytes than its header declares")
        self._put(memoryview(data))
        self._left -= data.nbytes
        if self._left == 0:
            self._advance()

    def _advance(self) -> None:
        self._index += 1
        self._left = self._plan[self._index][2] if self._index < len(self._plan) else 0

    def commit(self) -> str:
        """fsync and rename into place; returns the file's sha256."""
        while self._index < len(self._plan) and self._left == 0:
            self._advance()
        if self._index < len(self._plan):
            self.abort()
            raise RuntimeError(f"writer: tensor {self._plan[self._index][0]!r} was never (fully) written")
        if self._provisional:
            self.abort()
            raise RuntimeError("writer: the provisional header was never rewritten")
        try:
            self._f.flush()
            # fsync waits for the disk and hashing is CPU work: they overlap (both release the GIL).
            with ThreadPoolExecutor(1, thread_name_prefix="recmerge-fsync") as pool:
                synced = pool.submit(os.fsync, self._f.fileno())
                # Just written, so normally still in the page cache: this reads memory, not disk.
                sha = self._sha.hexdigest() if self._sha is not None else self._hash_back()
            synced.result()
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                if self.unnamed:  # give the data a name only now, beside its final one, then move it there
                    self.tmp = _fresh_name(self.path)
                    # A directory descriptor makes os.link call linkat, which can follow /proc's link to
                    # the unnamed file (a plain link() would try to link the symlink itself: EXDEV).
                    os.link(f"/proc/self/fd/{self._f.fileno()}", Path(self.tmp).name, dst_dir_fd=dfd,
                            follow_symlinks=True)
                self._f.close()
                os.replace(self.tmp, self.path)
                os.fsync(dfd)  # make the rename itself durable
            finally:
                os.close(dfd)
        except BaseException:
            self.abort()
            raise
        self.sha256 = sha
        return self.sha256

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()  # an unnamed file is gone with its last descriptor
        if self.tmp is not None:
            Path(self.tmp).unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if self.sha256 is None:
            self.abort()
