"""Keep freed memory in the process, so that large CPU temporaries stop page-faulting.

PyTorch's CPU tensors come from ``malloc``. By default glibc serves a large request (above its
mmap threshold, adapted at run time) with fresh pages and returns the free top of its heap to
the system (above its trim threshold), so a call that allocates tens of multi-MB temporaries
takes a page fault on every 4 KiB page of each of them, on every call. Measured on the
p = 1024 covariance (``nm bench floor --heap default``): ~9,000–11,000 minor faults per
``relu_moments`` call and 15,000–31,000 per DVI call when the two alternate: in alternating
runs, about a fifth of the eager exact call's time and a third to a half of DVI's.

``keep_freed_memory()`` fixes both thresholds (``mallopt``), so freed blocks up to
``MMAP_THRESHOLD`` are reused instead. The price: the process keeps its peak heap (freed memory
is not returned to the system until exit). The ``nm`` command line calls it once at start; a
library user opts in by calling it (or by setting glibc's ``MALLOC_TRIM_THRESHOLD_`` and
``MALLOC_MMAP_THRESHOLD_`` environment variables before starting Python).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: glibc's ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Requests up to this size (bytes) come from the heap: glibc's largest allowed value on 64-bit.
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free heap kept before any is returned to the system (bytes; ``mallopt`` takes an int).
TRIM_THRESHOLD = 2**31 - 1

_DONE: list[bool | None] = [None]


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (once per process); True where they were set,
    False where this is not glibc (macOS, Windows, musl) or ``mallopt`` refused (nothing is
    changed then)."""
    if _DONE[0] is None:
        _DONE[0] = _set_thresholds()
    return _DONE[0]


def _set_thresholds() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl has no such symbol)
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def minor_faults() -> int | None:
    """Minor page faults of this process so far (``getrusage``; None where it does not exist)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
