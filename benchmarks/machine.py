"""What machine a benchmark ran on: the CPU flags that decide its speed."""

from __future__ import annotations

FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")


def cpu_flags() -> str:
    """The speed-relevant flags of /proc/cpuinfo (bf16 and int8 units above all)."""
    try:
        with open("/proc/cpuinfo") as handle:
            text = handle.read()
    except OSError:
        return "unknown"
    found = [flag for flag in FLAGS if flag in text]
    return " ".join(found) or "none of avx2/avx512"
