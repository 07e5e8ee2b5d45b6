"""``release_freed_memory``: freed heap pages below a live allocation go back to the OS."""

from __future__ import annotations

import ctypes.util
import sys

import pytest

from jaxbooth.host_memory import release_freed_memory


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
                    reason="malloc_trim is glibc's")
def test_freed_pages_under_a_live_allocation_are_returned() -> None:
    chunks = [bytes(4000) + bytes([i % 256]) for i in range(50_000)]  # ~200 MB of malloc'd (not mmap'd) blocks
    pin = [bytes(4000) for _ in range(100)]  # live blocks above them: free() alone cannot shrink the heap
    before = _rss_mb()
    del chunks
    after_free = _rss_mb()
    assert release_freed_memory()
    after_release = _rss_mb()
    assert before - after_release > 150, (before, after_free, after_release)
    assert len(pin) == 100
