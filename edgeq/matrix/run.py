"""``edgeq matrix``: plan the cells, skip those the store holds, build the rest on an executor, write the summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgeq.matrix.cells import Cell, Skipped, plan_cells
from edgeq.matrix.events import Events
from edgeq.matrix.spec import load_matrix
from edgeq.matrix.store import FAILED, HIT, TODO, Store
from edgeq.matrix.summary import write_summary
from edgeq.progress import QUIET, Progress


@dataclass
class MatrixRun:
    cells: list[Cell]
    skipped: list[Skipped]
    results: dict[str, dict]  # key -> result.json, for every cell that has one
    hits: set[str]  # keys found built and verified: no work done for them
    built: set[str] = field(default_factory=set)  # keys an executor ran this time
    summary: list[Path] = field(default_factory=list)

    @property
    def not_ok(self) -> list[Cell]:
        return [c for c in self.cells if (self.results.get(c.key) or {}).get("status") != "ok"]


def run_matrix(matrix_file: Path, out: Path, executor, retry_failed: bool = False,
               progress: Progress = QUIET) -> MatrixRun:
    """Build every cell of ``matrix_file`` the store in ``out`` does not hold yet (failed ones too with
    ``retry_failed``) on ``executor`` (LocalExecutor or RayExecutor), then write OUT/matrix.{md,html,json}."""
    spec = load_matrix(matrix_file)
    progress.stage("check", f"{matrix_file}: {len(spec.models)} models x {len(spec.profiles)} profiles; hashing "
                            "the models and checking every cell's inputs")
    store = Store(out)
    cells, skipped = plan_cells(spec, store.cells)
    states = {c.key: store.state(c) for c in cells}
    hits = {k for k, (state, _) in states.items() if state == HIT}
    failed = [c for c in cells if states[c.key][0] == FAILED]
    todo = [c for c in cells if states[c.key][0] == TODO or (retry_failed and states[c.key][0] == FAILED)]
    run = MatrixRun(cells, skipped, {k: r for k, (_, r) in states.items() if r is not None}, hits,
                    {c.key for c in todo})
    again = "built again: --retry-failed" if retry_failed else "kept: --retry-failed builds them again"
    progress.stage("matrix", f"{len(cells)} cells ({len(skipped)} combinations skipped): {len(hits)} cache hits, "
                             f"{len(failed)} failed before" + (f" ({again})" if failed else "")
                             + f", {len(todo)} to build on {executor.describe()}")
    events = Events(progress, len(todo))
    try:
        if todo:
            for cell in todo:
                store.write_cell(cell)
            executor.run(todo, store, events)
    finally:
        run.results.update(events.results)
        run.summary = write_summary(Path(out), Path(matrix_file), cells, skipped, run.results, hits)
    progress.stage("done", f"{len(cells) - len(run.not_ok)} of {len(cells)} cells ok; summary {run.summary[0]}")
    return run
