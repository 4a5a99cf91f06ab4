"""Memory a large allocation will need, checked against what the device has.

A D x D scatter matrix at D = 262 144 is 550 GB, a forward pass of a 100 000 px
input 1.4 TB: the allocator's own error names neither the cause nor the fix. These
checks run before such allocations and say both.
"""

from __future__ import annotations

import os

import torch

__all__ = ["total_bytes", "check_fits_in_memory"]


def total_bytes(device: torch.device) -> int | None:
    """All the memory ``device`` has (a GPU's, or the machine's RAM), or None when
    unknown. The whole, not what is free now: caches, PyTorch's cached blocks and a
    heap kept by ``keep_freed_memory`` can be reused, so only what cannot fit at
    all is refused."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[1])
        except (RuntimeError, AssertionError):  # pragma: no cover - no driver
            return None
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def _gigabytes(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.1f} GiB"


def check_fits_in_memory(nbytes: int, device: torch.device, what: str, fix: str):
    """Raise MemoryError naming ``what`` and ``fix`` when ``nbytes`` cannot fit."""
    total = total_bytes(device)
    if total is not None and nbytes > total:
        raise MemoryError(
            f"{what} needs {_gigabytes(nbytes)} on {device}, which has "
            f"{_gigabytes(total)} in all: {fix}"
        )
