"""Resident memory of this process, for the benchmarks (Linux /proc)."""

from __future__ import annotations


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """The resident high-water mark. VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork and exec, so a
    worker started by a big parent would report the parent's peak."""
    return _status_mb("VmHWM")
