"""edgeq.heap: freed memory goes back to the OS (glibc), measured as the process's RSS."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.heap import _glibc, release_freed_memory, return_large_blocks


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(_glibc("mallopt") is None, reason="glibc only")
def test_large_freed_blocks_leave_the_process():
    return_large_blocks()
    before = _rss_mb()
    blocks = [np.ones(2 << 20, np.uint8) for _ in range(100)]  # 200 MB in 2 MB blocks, each touched
    assert _rss_mb() - before > 150
    del blocks
    release_freed_memory()
    assert _rss_mb() - before < 50  # measured: ~0 MB back above where it started
