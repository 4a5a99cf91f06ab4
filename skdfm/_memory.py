"""Memory a large allocation will need, checked against what the device has.

A D x D scatter matrix at D = 262 144 is 550 GB, a forward pass of a 100 000 px
input 1.4 TB: the allocator's own error names neither the cause nor the fix. These
checks run before such allocations and say both.
"""

from __future__ import annotations

import os

import torch

__all__ = ["available_bytes", "check_fits_in_memory"]


def available_bytes(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``, or None when unknown."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):  # pragma: no cover - no driver
            return None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return None


def _gigabytes(nbytes: float) -> str:
    return f"{nbytes / 2**30:,.1f} GiB"


def check_fits_in_memory(nbytes: int, device: torch.device, what: str, fix: str):
    """Raise MemoryError naming ``what`` and ``fix`` when ``nbytes`` cannot fit."""
    available = available_bytes(device)
    if available is not None and nbytes > available:
        raise MemoryError(
            f"{what} needs {_gigabytes(nbytes)} on {device}, which has "
            f"{_gigabytes(available)} available: {fix}"
        )
