"""The local executor: a pool of worker processes on this machine, admitted by declared memory.

At most ``jobs`` cells build at once, and a cell starts only while the memory the running cells declared plus its
own fits the budget: the memory available when the matrix starts (/proc/meminfo MemAvailable), less a reserve for
everything else. A waiting cell that does not fit lets a smaller one behind it start (backfill); a cell that could not
fit even alone fails at once, with the numbers. A worker that dies (the kernel's OOM killer, a crash in a native
library) fails its cell only; the others go on, and --retry-failed builds it again.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from edgeq.matrix.cells import Cell
from edgeq.matrix.events import Events
from edgeq.matrix.store import Store
from edgeq.matrix.worker import Child, collect, finish, start_child

RESERVE_MB = 1024  # left to the driver, the shell and the page cache's working set
POLL_S = 0.2


def available_memory_mb(meminfo: Path = Path("/proc/meminfo")) -> int:
    """MemAvailable (what the kernel can give without swapping), or the physical memory where it is not reported."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)


@dataclass
class LocalExecutor:
    jobs: int = 1
    memory_mb: int | None = None  # the budget; None: available_memory_mb() - RESERVE_MB when run starts

    def describe(self) -> str:
        return f"this machine ({self.jobs} job{'s' if self.jobs > 1 else ''} at once)"

    def run(self, cells: list[Cell], store: Store, events: Events) -> None:
        budget = self.memory_mb or available_memory_mb() - RESERVE_MB
        declared = sorted(c.memory_mb for c in cells)
        events.note(f"memory budget {budget} MB; the cells declare {declared[0]}" +
                    (f" to {declared[-1]}" if declared[-1] != declared[0] else "") + " MB each")
        waiting: list[Cell] = []
        for cell in cells:
            if cell.memory_mb > budget:
                events.finished(cell, finish(store, cell.key, "", {"status": "failed", "error": {
                    "type": "MemoryBudgetError", "stage": "schedule",
                    "message": f"the cell declares a peak of {cell.memory_mb} MB; this machine has {budget} MB for "
                               "the matrix", "hint": "build it on a larger machine or on Ray (--ray), or set the "
                               "model's memory_mb in the matrix file if the estimate is too high"}},
                    store.result(cell.key), time.time(), None))
            else:
                waiting.append(cell)
        running: dict[str, tuple[Cell, Child]] = {}
        try:
            while waiting or running:
                used = sum(c.memory_mb for c, _ in running.values())
                for cell in list(waiting):
                    if len(running) >= self.jobs:
                        break
                    if used + cell.memory_mb <= budget:
                        waiting.remove(cell)
                        running[cell.key] = (cell, start_child(store, cell.key))
                        used += cell.memory_mb
                        events.started(cell)
                time.sleep(POLL_S)
                for key, (cell, child) in list(running.items()):
                    if child.poll() is not None:
                        del running[key]
                        events.finished(cell, collect(child))
                events.tick(len(waiting))
        finally:  # interrupted: stop the workers (each removes its staging folder) and record nothing
            for _, child in running.values():
                child.process.terminate()
            for _, child in running.values():
                child.process.wait()
