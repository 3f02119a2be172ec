"""The summary's rows for cells that are not built (the built ones: tests/matrix/test_local.py)."""

from __future__ import annotations

from pathlib import Path

from edgeq.matrix.cells import Cell, Skipped
from edgeq.matrix.summary import summary_markdown, write_summary
from edgeq.pipeline import ExportRequest


def cell(name: str, key: str) -> Cell:
    return Cell(key * 64, name, "m", "android-arm64", ExportRequest(Path("m"), "android-arm64"), None, 1500)


FAILED = {"status": "failed", "seconds": 3.2, "peak_rss_mb": None, "device": {"target": "arm64", "ok": False},
          "error": {"type": "VerificationError", "stage": "device", "message": "a | b\nc", "hint": "rerun it"}}


def test_failed_interrupted_and_skipped_cells_say_what_happened(tmp_path):
    cells = [cell("m-android-arm64", "a"), cell("n-android-arm64", "b")]
    md = summary_markdown(cells, [Skipped("llm", "ios-arm64", "profile 'ios-arm64' takes encoder models")],
                          {"a" * 64: FAILED}, set(), tmp_path)
    assert md.startswith("2 cells: 0 ok, 2 not ok, 0 cache hits")
    assert ("| m-android-arm64 | FAILED, device: VerificationError: a / b c (hint: rerun it) | — | — | "
            "arm64: FAILED | 3 | — | no | aaaaaaaaaaaa |") in md  # one line, no pipe inside a cell
    assert "| n-android-arm64 | not built (interrupted) | — |" in md
    assert "Skipped: llm x ios-arm64 (profile 'ios-arm64' takes encoder models)" in md
    assert "Packages" not in md  # edgeq report's table only lists built packages


def test_the_three_files_are_written(tmp_path):
    paths = write_summary(tmp_path, Path("m.toml"), [cell("m-android-arm64", "a")], [], {"a" * 64: FAILED}, set())
    assert [p.name for p in paths] == ["matrix.md", "matrix.html", "matrix.json"]
    assert paths[0].read_text().startswith("# edgeq matrix: m.toml\n")
    assert "<td>m-android-arm64</td>" in paths[1].read_text()
