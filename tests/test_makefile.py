"""The Makefile's android-qnn-htp target, run by make against a stand-in ``edgeq`` (BIN=...): a log that
``make ... > log 2>&1`` writes keeps every line. The target used to pipe the export through ``tee /dev/stderr``,
which reopens stderr and truncated that log, losing the export's progress (issue 17)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# What the target reads from `edgeq export`: progress on stderr, "wrote PACKAGE" on stdout; EXPORT_RC fails it.
FAKE_EDGEQ = """#!/bin/sh
case "$1" in
  export) echo "[   0.0s] check: the first progress line" >&2
          test "${EXPORT_RC:-0}" = 0 || { echo "error: the export failed" >&2; exit "$EXPORT_RC"; }
          echo "wrote $FAKE_OUT/m-android-qnn-htp"; echo "accuracy vs FP32: fine" ;;
  verify) echo "verified $2 on $4" ;;
esac
"""


def make_qnn(tmp_path: Path, export_rc: int) -> tuple[int, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "edgeq").write_text(FAKE_EDGEQ)  # newer than pyproject.toml: make's setup rule has nothing to do
    (bin_dir / "edgeq").chmod(0o755)
    log = tmp_path / "log"
    with open(log, "w") as f:
        run = subprocess.run(["make", "-s", "-C", str(ROOT), "android-qnn-htp", "MODEL=m", f"BIN={bin_dir}"],
                             stdout=f, stderr=subprocess.STDOUT, timeout=60,
                             env={"PATH": "/usr/bin:/bin", "FAKE_OUT": str(tmp_path / "out"),
                                  "EXPORT_RC": str(export_rc)})
    return run.returncode, log.read_text()


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_qnn_target_log_redirected_to_a_file_keeps_every_line(tmp_path):
    rc, log = make_qnn(tmp_path, 0)
    assert rc == 0, log
    pkg = tmp_path / "out" / "m-android-qnn-htp"
    assert log.splitlines() == [
        f'{tmp_path}/bin/edgeq export "m" --profile android-qnn-htp -o build --force',
        "[   0.0s] check: the first progress line",
        f"wrote {pkg}",
        "accuracy vs FP32: fine",
        f"{tmp_path}/bin/edgeq verify {pkg} --on qnn-htp",
        f"verified {pkg} on qnn-htp",
    ]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_qnn_target_stops_with_the_exports_status(tmp_path):
    rc, log = make_qnn(tmp_path, 2)
    assert rc != 0 and "error: the export failed" in log and "verify" not in log.split("--force", 1)[1], log
