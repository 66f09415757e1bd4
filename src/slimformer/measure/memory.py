"""Resident memory of this process: its high-water mark (to say which phase of a long job needs the most), and
handing freed heap back to the operating system between phases."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache

import psutil


def peak_resident_mib() -> float | None:
    """The most resident memory this process has held so far, in MiB (None where the platform cannot say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # kilobytes on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


@cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return None


def release_freed_memory() -> bool:
    """Return the heap that freed tensors left behind to the operating system (glibc's ``malloc_trim``).

    glibc keeps freed blocks for reuse; after one phase frees many differently sized tensors (the Fisher's
    backward passes), the next phase's allocations of other sizes can grow the heap beside them instead of reusing
    them, so the process's peak is the sum of both phases. Returns whether anything could be trimmed.
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


class HeapTrimmer:
    """Call between the steps of a long loop: hands freed heap back (:func:`release_freed_memory`) once the
    resident set has grown by more than ``slack_bytes`` since the last time, so a trim (tens of milliseconds on a
    large heap) is paid only when memory has piled up."""

    def __init__(self, slack_bytes: int = 256 * 2**20) -> None:
        self.slack = slack_bytes
        self._process = psutil.Process()
        self.floor = self._process.memory_info().rss
        self.trims = 0

    def __call__(self) -> None:
        if self._process.memory_info().rss - self.floor > self.slack:
            release_freed_memory()
            self.trims += 1
            self.floor = self._process.memory_info().rss
