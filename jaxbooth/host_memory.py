"""Keep freed host memory in the process (glibc), so training steps stop page-faulting.

Why: XLA:CPU (and torch on CPU) allocate a step's temporaries afresh every step. glibc
serves large blocks with ``mmap`` and hands them back with ``munmap`` on free, so the next
step page-faults and zero-fills the same hundreds of MB again; with several malloc arenas,
freed blocks also scatter. On 2 CPU cores that kernel work was about a third of a small
UNet's training step. One arena, no ``mmap`` for large blocks and no trimming keep the freed
memory for reuse: the peak resident size stays what the step needs, and steps get faster.

Does nothing off glibc, when the user tuned malloc themselves (``MALLOC_*``, ``GLIBC_TUNABLES``) (their
choice wins), or with ``JAXBOOTH_KEEP_FREED_MEMORY=0``.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt(3) parameter numbers from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (absent on musl)
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Apply the settings above once per process; True when they took effect."""
    if os.environ.get("JAXBOOTH_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if any(name.startswith("MALLOC_") for name in os.environ) or "glibc.malloc" in os.environ.get(
            "GLIBC_TUNABLES", ""):
        return False
    libc = _glibc()
    if libc is None:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in _SETTINGS)
