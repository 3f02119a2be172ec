"""What an executor reports while a matrix runs: cells started and finished, as progress lines on stderr in
``edgeq.progress``'s style (``[  26.0s]   bert-ios-arm64: ok in 11.8 s, peak 1.2 GB; 3/6 done, 2 running, 0
failed``), and a count line whenever STATUS_EVERY seconds pass without one."""

from __future__ import annotations

import time

from edgeq.matrix.cells import Cell
from edgeq.progress import Progress

STATUS_EVERY = 30.0


def outcome_text(result: dict) -> str:
    """'ok in 11.8 s, peak 1230 MB' or 'FAILED (AccuracyBudgetError): ...' for a result.json."""
    if result["status"] == "ok":
        peak = result.get("peak_rss_mb")
        device = result.get("device")
        return (f"ok in {result.get('seconds', 0):.1f} s" + (f", peak {peak:.0f} MB" if peak else "")
                + (f", checked on {device['target']}" if device else ""))
    error = result.get("error") or {}
    return f"FAILED ({error.get('type', 'error')}): {error.get('message', '')}"[:300]


class Events:
    def __init__(self, progress: Progress, total: int) -> None:
        self.progress = progress
        self.total = total
        self.results: dict[str, dict] = {}
        self.started_keys: set[str] = set()
        self.running = 0
        self.failed = 0
        self._last = time.monotonic()

    @property
    def done(self) -> int:
        return len(self.results)

    def counts(self) -> str:
        return f"{self.done}/{self.total} done, {self.running} running, {self.failed} failed"

    def note(self, text: str) -> None:
        self._line(text)

    def started(self, cell: Cell) -> None:
        self.started_keys.add(cell.key)
        self.running += 1
        self._line(f"{cell.name}: started ({cell.memory_mb} MB declared)")

    def set_running(self, n: int) -> None:
        """Executors that learn what runs only by looking (Ray) set the count."""
        self.running = n

    def finished(self, cell: Cell, result: dict) -> None:
        if cell.key in self.started_keys:
            self.started_keys.discard(cell.key)
            self.running = max(0, self.running - 1)
        self.results[cell.key] = result
        self.failed += result["status"] == "failed"
        self._line(f"{cell.name}: {outcome_text(result)}; {self.counts()}")

    def tick(self, waiting: int | None = None) -> None:
        if time.monotonic() - self._last >= STATUS_EVERY:
            self._line(f"cells: {self.counts()}" + (f", {waiting} waiting" if waiting else ""))

    def _line(self, text: str) -> None:
        self._last = time.monotonic()
        self.progress.line(text)
