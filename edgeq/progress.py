"""Progress on stderr: stage headers and counted steps, so long runs show where they are."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, enabled: bool = True, stream=None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()

    def stage(self, name: str, detail: str = "") -> None:
        self._print(f"[{time.monotonic() - self.t0:6.1f}s] {name}" + (f": {detail}" if detail else ""))

    def step(self, what: str, i: int, n: int) -> None:
        self._print(f"           {what} {i}/{n}")

    def _print(self, line: str) -> None:
        if self.enabled:
            try:
                print(line, file=self.stream, flush=True)
            except BrokenPipeError:  # `edgeq export ... 2>&1 | head`: the reader left; the export goes on, unheard
                self.enabled = False


QUIET = Progress(enabled=False)
