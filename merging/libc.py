"""C library calls Python's os module lacks, looked up once; None where the C library has no such call."""

from __future__ import annotations

import ctypes
import ctypes.util


def libc_function(name: str, argtypes: list, restype=ctypes.c_int):
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True), name)
    except (OSError, AttributeError):  # no such call here (sync_file_range is Linux's, mallopt glibc's)
        return None
    fn.argtypes, fn.restype = argtypes, restype
    return fn
