"""Process-wide performance settings that an application (the CLI, a benchmark) may opt into explicitly."""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse freed blocks instead of handing them back to the OS after every training step.

    By default, PyTorch's CPU tensors of a few MB are mapped fresh and unmapped again on every step, so each step
    page-faults tens of MB back in, a large share of a small model's step time (docs/benchmarks.md). Raising the mmap and trim thresholds keeps those blocks in the heap for reuse. Returns whether
    the setting was applied (only on Linux with glibc); it changes speed and memory reuse, never results.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
