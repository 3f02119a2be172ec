"""Progress on stderr: stage headers and counted steps, each with the seconds since the run started, so long runs
show where they are.

Stage lines start at the margin (``[  12.3s] calibrate: ...``: what ``bench/scale.py`` splits a run at); step and
heartbeat lines are indented under them. Steps of one counter print at most once a second (its first and last
always), so a per-tensor counter over hundreds of tensors stays readable. With ``heartbeat`` a background thread
also prints a line whenever that many seconds passed without one (inside optimum's exporter, ONNX Runtime's
converter, a long lm_head): no stretch of a run is silent for longer. A run that uses it closes the Progress
(``with Progress(...) as p:``), which stops the thread.
"""

from __future__ import annotations

import math
import sys
import threading
import time

STEP_EVERY = 1.0  # seconds between two lines of one step counter
HEARTBEAT = 10.0  # the CLI's: seconds without a line before a heartbeat line


class Progress:
    def __init__(self, enabled: bool = True, stream=None, heartbeat: float | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self.heartbeat = heartbeat
        self._lock = threading.Lock()
        self._stage, self._stage_start, self._last_line = "start", self.t0, self.t0
        self._last_step: tuple[str, float] = ("", -math.inf)
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None

    def stage(self, name: str, detail: str = "") -> None:
        now = time.monotonic()
        self._stage, self._stage_start = name, now
        self._print(f"[{now - self.t0:6.1f}s] {name}" + (f": {detail}" if detail else ""), now)
        if self.heartbeat and self.enabled and self._ticker is None:
            self._ticker = threading.Thread(target=self._tick, name="edgeq-progress", daemon=True)
            self._ticker.start()

    def step(self, what: str, i: int, n: int) -> None:
        now = time.monotonic()
        last_what, last_time = self._last_step
        if i in (1, n) or what != last_what or now - last_time >= STEP_EVERY:
            self._last_step = (what, now)
            self._print(f"[{now - self.t0:6.1f}s]   {what} {i}/{n}", now)

    def line(self, text: str) -> None:
        """An indented line under the current stage, always printed (events, not counters: a matrix's cells)."""
        now = time.monotonic()
        self._print(f"[{now - self.t0:6.1f}s]   {text}", now)

    def close(self) -> None:
        """Stop the heartbeat thread (a no-op without one)."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _tick(self) -> None:
        while not self._stop.wait(min(1.0, self.heartbeat)):
            now = time.monotonic()
            if now - self._last_line >= self.heartbeat:
                self._print(f"[{now - self.t0:6.1f}s]   {self._stage}: {now - self._stage_start:.0f} s in this stage",
                            now)

    def _print(self, line: str, now: float) -> None:
        if not self.enabled:
            return
        with self._lock:  # the heartbeat thread prints too: whole lines, one at a time
            self._last_line = now
            try:
                print(line, file=self.stream, flush=True)
            except BrokenPipeError:  # `edgeq export ... 2>&1 | head`: the reader left; the export goes on, unheard
                self.enabled = False


QUIET = Progress(enabled=False)
