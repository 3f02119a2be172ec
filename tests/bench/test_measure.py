"""bench/measure.py: a child's own wall time and peak RSS (not the parent's), the RSS cap and the timeout."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import measure  # noqa: E402

MB = 10**6


def _allocating(mb: int, then: str = "") -> list[str]:
    """A child that holds mb MB of touched memory, then runs ``then``."""
    return [sys.executable, "-c",
            f"b = bytearray({mb} * 10**6); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(0.5); {then}"]


def test_peak_rss_is_the_childs_own_not_the_parents(tmp_path):
    parent = bytearray(600 * MB)
    parent[::4096] = b"x" * len(parent[::4096])  # the parent now holds 600 MB, which a plain ru_maxrss would report
    m = measure.run(_allocating(200), log_dir=tmp_path)
    assert m.status == "ok" and m.returncode == 0
    # 200 MB plus a bare interpreter (~10 MB) and the launcher's floor; measured 0.21 GB here.
    assert 0.19 < m.wait4_peak_gb < 0.26
    assert 0.19 < m.peak_rss_gb < 0.26
    assert m.sampled_peak_gb <= m.peak_rss_gb
    assert m.wall_s >= 0.5 and m.cpu_s is not None
    series = measure.read_series(tmp_path)  # every sample, in order; its maximum is the sampled peak
    assert len(series) >= 2 and [t for t, _ in series] == sorted(t for t, _ in series)
    assert max(b for _, b in series) / 1e9 == pytest.approx(m.sampled_peak_gb)
    del parent


def test_a_child_above_the_cap_is_killed_and_its_rss_recorded(tmp_path):
    grow = ("import time\nheld = []\nfor _ in range(60):\n    b = bytearray(50 * 10**6); b[::4096] = b'x' * "
            "len(b[::4096]); held.append(b); time.sleep(0.05)")
    m = measure.run([sys.executable, "-c", grow], log_dir=tmp_path, cap_gb=0.3)
    assert m.status.startswith("killed at ") and "(cap 0.3 GB)" in m.status
    assert m.returncode is None and m.wait4_peak_gb is None
    assert 0.3 < m.peak_rss_gb < 0.6  # sampled every 0.2 s while the child grows 1 GB/s at most
    assert m.wall_s < 10


def test_a_child_over_time_is_stopped(tmp_path):
    m = measure.run([sys.executable, "-c", "import time; time.sleep(30)"], log_dir=tmp_path, timeout_s=1)
    assert m.status == "timeout after 1 s" and m.wall_s < 5


def test_a_failing_child_reports_its_exit_code_and_stderr(tmp_path):
    m = measure.run([sys.executable, "-c", "import sys; sys.exit('no such model')"], log_dir=tmp_path)
    assert m.status == "failed (exit 1)" and m.returncode == 1
    assert m.stderr_tail == "no such model"


def test_the_sampled_sum_counts_processes_side_by_side(tmp_path):
    # Two children of 100 MB side by side: ru_maxrss is a per-process maximum (~0.11 GB), the sampled sum sees both.
    both = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', \"b = bytearray(100 * 10**6); "
            "b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(1.5)\"]); b = bytearray(100 * 10**6); "
            "b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(1.5); p.wait()")
    m = measure.run([sys.executable, "-c", both], log_dir=tmp_path)
    assert m.status == "ok"
    assert 0.1 < m.wait4_peak_gb < 0.13
    assert 0.2 < m.sampled_peak_gb < 0.28 and m.peak_rss_gb == m.sampled_peak_gb
