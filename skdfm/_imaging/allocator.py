"""Keep freed memory in the heap (glibc): CPU backbones stop page-faulting.

With glibc's default malloc every allocation above the mmap threshold (adaptive, up
to 32 MiB) is served by fresh pages from the kernel and unmapped again when freed, so
a CNN on CPU page-faults its large activations anew at every batch. Serving them
from the heap (``M_MMAP_MAX = 0``) and keeping freed heap memory for reuse (a high
``M_TRIM_THRESHOLD``) removes those faults. The process then keeps its peak heap
size until it exits instead of returning memory between batches.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_ENV = "SKDFM_KEEP_FREED_MEMORY"
_applied: bool | None = None


def keep_freed_memory(force: bool = False) -> bool:
    """Tune glibc malloc to keep freed memory; returns whether it is in effect.

    Done at most once per process. Off when the environment variable
    ``SKDFM_KEEP_FREED_MEMORY=0`` is set (unless ``force``), and a no-op where the
    C library is not glibc (macOS, Windows, musl).
    """
    global _applied
    if _applied is not None and not force:
        return _applied
    _applied = False
    if os.environ.get(_ENV, "1") == "0" and not force:
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # only glibc has both  # noqa: B018
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    )
    return _applied
