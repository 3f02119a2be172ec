"""The matrix's summary: OUT/matrix.md, OUT/matrix.html and OUT/matrix.json, one row per cell (status, size,
accuracy, device check, time, peak RSS, cache hit), then ``edgeq report``'s comparison table of the packages built
(``edgeq.report``: the same rows, Markdown and HTML as ``edgeq report --no-speed``)."""

from __future__ import annotations

import json
from pathlib import Path

from edgeq.matrix.cells import Cell, Skipped
from edgeq.report import Row, html_page, markdown_table, package_row, write_atomic

COLUMNS = ("cell", "status", "size MB", "accuracy vs FP32", "device check", "time s", "peak RSS MB", "cache hit", "key")


def _plain(text: str) -> str:
    """A table cell: one line, no pipe."""
    return " ".join(str(text).split()).replace("|", "/")


def accuracy_text(kind: str | None, a: dict) -> str:
    if not a:
        return "—"
    if kind == "causal-lm":
        return f"perplexity {a.get('ppl_increase', 0):+.2%}, top-1 {a.get('top1_agreement', 0):.3f}"
    return f"mean cosine {a.get('mean_cosine', 0):.5f}, min {a.get('min_cosine', 0):.4f}"


def status_text(result: dict | None) -> str:
    if result is None:
        return "not built (interrupted)"
    if result["status"] == "ok":
        return "ok"
    e = result.get("error") or {}
    hint = f" (hint: {e['hint']})" if e.get("hint") else ""
    return _plain(f"FAILED, {e.get('stage', 'export')}: {e.get('type', 'error')}: {e.get('message', '')}{hint}")


def device_text(result: dict | None) -> str:
    device = (result or {}).get("device")
    return "—" if not device else f"{device['target']}: {'ok' if device['ok'] else 'FAILED'}"


def cell_line(cell: Cell, result: dict | None, hit: bool) -> str:
    r = result or {}
    size = r.get("size_bytes")
    cells = [cell.name, status_text(result), "—" if not size else f"{size / 1e6:.1f}",
             accuracy_text(r.get("kind"), r.get("accuracy") or {}) if r.get("status") == "ok" else "—",
             device_text(result), "—" if r.get("seconds") is None else f"{r['seconds']:.0f}",
             "—" if not r.get("peak_rss_mb") else f"{r['peak_rss_mb']:.0f}", "yes" if hit else "no", cell.key[:12]]
    return "| " + " | ".join(cells) + " |"


def package_rows(cells: list[Cell], results: dict[str, dict], store_cells: Path) -> list[Row]:
    """``edgeq report``'s row of every package built, named by its cell, with the build's time and peak RSS."""
    rows = []
    for cell in cells:
        r = results.get(cell.key) or {}
        if r.get("status") == "ok":
            row = package_row(store_cells / cell.key / r["package"]["name"], speed=False)
            row.name, row.build_s, row.peak_rss_mb = cell.name, r.get("seconds"), r.get("peak_rss_mb")
            rows.append(row)
    return rows


def summary_markdown(cells: list[Cell], skipped: list[Skipped], results: dict[str, dict], hits: set[str],
                     store_cells: Path) -> str:
    """The summary without its title (html_page reads blocks of table rows and plain lines)."""
    ok = sum((results.get(c.key) or {}).get("status") == "ok" for c in cells)
    lines = [f"{len(cells)} cells: {ok} ok, {len(cells) - ok} not ok, {len(hits)} cache hits (built before, not "
             f"rebuilt); packages in {store_cells}/KEY/.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [cell_line(c, results.get(c.key), c.key in hits) for c in cells]
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{s.model} x {s.profile} ({s.reason})" for s in skipped)]
    rows = package_rows(cells, results, store_cells)
    if rows:
        lines += ["", "Packages (edgeq report, accuracy from the manifests):", "", markdown_table(rows).rstrip()]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, matrix_file: Path, cells: list[Cell], skipped: list[Skipped], results: dict[str, dict],
                  hits: set[str]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    body = summary_markdown(cells, skipped, results, hits, out / "cells")
    data = {"matrix": str(matrix_file),
            "cells": [{**c.to_dict(), "result": results.get(c.key), "cache_hit": c.key in hits} for c in cells],
            "skipped": [{"model": s.model, "profile": s.profile, "reason": s.reason} for s in skipped]}
    return [write_atomic(out / "matrix.md", f"# edgeq matrix: {matrix_file.name}\n\n{body}"),
            write_atomic(out / "matrix.html", html_page(body, [], f"edgeq matrix: {matrix_file.name}")),
            write_atomic(out / "matrix.json", json.dumps(data, indent=1) + "\n")]
