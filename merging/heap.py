"""glibc malloc thresholds for streaming passes.

A merge pass allocates and frees blocks of a few MiB many times per second (reads, temporaries). With
glibc's defaults the heap top is handed back to the kernel whenever more than twice the (dynamic) mmap
threshold lies free, and the next blocks fault their pages in again: ~210,000 page faults in one merge of
3 x 1 GB checkpoints + 3 Fishers, ~40,000 with these settings (docs/results/merge_memory.md, run 5).
The settings are process-wide; they are what glibc's own dynamic threshold reaches after freeing one
32 MiB block, with a trim threshold that keeps a pass's working set (~100 MiB) in place."""

from __future__ import annotations

import ctypes
import threading

from merging.libc import libc_function

MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_done = False
_lock = threading.Lock()


def keep_freed_blocks() -> bool:
    """Set the thresholds once per process; False where the C library has no mallopt (not glibc)."""
    global _done
    with _lock:
        if _done:
            return True
        mallopt = libc_function("mallopt", [ctypes.c_int, ctypes.c_int])
        if mallopt is None:
            return False
        _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        return _done
