"""One cell, built in a process of its own: ``python -m edgeq.matrix.worker CELL_DIR RUN_ID STARTED NODE``.

Both executors start this process per cell (the local pool directly, a Ray task from its worker), so a cell is built
the same way everywhere: the pipeline's own ``export_package`` (checks, staging folder, verify, one rename), then the
device check the cell asks for, then result.json. A process per cell also measures the cell alone: its peak RSS is
the process's own (``ru_maxrss``, children included), and a crash in a native library ends this cell, not the pool.

``STARTED`` is the wall-clock time the parent started it at (a cell's time counts the imports too), ``NODE`` where
it runs as result.json names it (a Ray node's address; the host name when empty).

Exit status: 0 built and verified, 1 the cell failed (its error is in result.json), 3 another worker holds the cell,
128 + N stopped by signal N (no result: the cell is built again).
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from edgeq.errors import DestinationBusyError, EdgeqError
from edgeq.matrix.cells import cell_key, differences, identity, request_from
from edgeq.matrix.store import CELL_FILE, LOG_FILE, Store, package_record, read_json
from edgeq.staging import die_with_parent

BUSY = 3
BUG_HINT = "this is an edgeq bug; please report it with the cell's worker.log"


def _error(exc: BaseException, stage: str) -> dict:
    if isinstance(exc, EdgeqError):
        return {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint, "stage": stage}
    return {"type": type(exc).__name__, "message": str(exc) or type(exc).__name__, "hint": BUG_HINT, "stage": stage}


def _peak_rss_mb() -> float:
    """This process's peak RSS, or its largest child's (the ORT converter) when larger; Linux reports KiB."""
    kib = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return round(kib * 1024 / 1e6, 1)


def _device_check(package: Path, target: str) -> tuple[dict, dict | None]:
    """(the device record, the error when the package fails there or the device cannot run)."""
    from edgeq.stages.verify import verify

    try:
        report = verify(package, on=target)
    except EdgeqError as exc:
        return {"target": target, "ok": False, "checks": []}, _error(exc, "device")
    record = {"target": target, "ok": report.ok, "checks": [list(c) for c in report.checks]}
    if report.ok:
        return record, None
    bad = "; ".join(f"{n}: {d}" for n, ok, d in report.checks if not ok)
    return record, {"type": "VerificationError", "message": f"{package.name} failed on {target}: {bad}"[:2000],
                    "hint": f"the package is kept and verified on the host; 'edgeq verify {package} --on {target}' "
                            "reproduces it", "stage": "device"}


def build(store: Store, key: str, previous: dict | None, node: str) -> dict:
    """Export the cell (unless its verified package is already in place), check it on its device, return the
    result fields (errors raised)."""
    from edgeq.manifest import read_manifest
    from edgeq.pipeline import check_inputs, export_package
    from edgeq.progress import HEARTBEAT, Progress

    folder = store.cell_dir(key)
    cell = read_json(folder / CELL_FILE)
    req = request_from(cell, folder)
    inputs = check_inputs(req)
    mine = identity(inputs, req)
    if cell_key(mine) != key:
        changed = differences(cell["inputs"], mine)
        raise EdgeqError(f"this worker ({node or socket.gethostname()}) sees other inputs than the matrix's driver "
                         f"did: {'; '.join(changed[:4])}",
                         "install the same edgeq and tool versions on every node, and give every node the same model "
                         "files at the same path")
    if previous and store.package_intact(key, previous):  # only the device check is left to do
        record = previous["package"]
    else:
        store.clean_staging(key)
        with Progress(heartbeat=HEARTBEAT) as progress:
            record = package_record(export_package(req, progress, inputs).path)
    package = folder / record["name"]
    m = read_manifest(package)
    result = {"status": "ok", "package": record, "kind": m.source.kind, "size_bytes": m.model_bytes(),
              "accuracy": m.accuracy.numbers(), "device": None, "error": None}
    if cell["device"]:
        result["device"], error = _device_check(package, cell["device"])
        if error:
            result.update(status="failed", error=error)
    return result


def run(cell_dir: Path, run_id: str, started: float, node: str) -> int:
    store, key = Store(cell_dir.parent.parent), cell_dir.name
    try:
        with store.lock(key):
            return run_locked(store, key, run_id, started, node)
    except DestinationBusyError as exc:  # the cell's lock only: every error of the build is the cell's result
        print(f"error: {exc.message}", file=sys.stderr)
        return BUSY


def run_locked(store: Store, key: str, run_id: str, started: float, node: str) -> int:
    store.mark_running(key, {"pid": os.getpid(), "parent_pid": os.getppid(), "node": node, "run": run_id})
    previous = store.result(key)
    try:
        result = build(store, key, previous, node)
    except EdgeqError as exc:
        result = {"status": "failed", "error": _error(exc, "export")}
        print(f"error: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - the cell's error, recorded; the traceback goes to worker.log
        traceback.print_exc()
        result = {"status": "failed", "error": _error(exc, "export")}
    if result["status"] == "failed" and "package" not in result and store.package_intact(key, previous):
        result["package"] = previous["package"]  # a failed device check leaves the verified package as it was
    result.update(pid=os.getpid(), parent_pid=os.getppid())  # the parent: a Ray worker, or the local driver
    finish(store, key, run_id, result, previous, started, _peak_rss_mb(), node)
    return 0 if result["status"] == "ok" else 1


def finish(store: Store, key: str, run_id: str, result: dict, previous: dict | None, started: float,
           peak_rss_mb: float | None, node: str = "") -> dict:
    """Write the cell's result.json (the attempt counted, the seconds since ``started`` (time.time()) and the peak
    memory, None when unknown) and clear running.json."""
    written = store.write_result(key, {
        **result, "run": run_id, "attempts": (previous or {}).get("attempts", 0) + 1,
        "seconds": round(time.time() - started, 1),
        "peak_rss_mb": peak_rss_mb, "node": node or socket.gethostname(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    store.clear_running(key)
    return written


# ---------------------------------------------------------------------------------------------------- the parent side

@dataclass
class Child:
    """A worker process building one cell."""

    store: Store
    key: str
    run_id: str
    process: subprocess.Popen
    started: float  # time.time()
    node: str

    def poll(self) -> int | None:
        return self.process.poll()


def start_child(store: Store, key: str, node: str = "") -> Child:
    """Start ``python -m edgeq.matrix.worker`` on the cell; its output goes to the cell's worker.log. It dies with
    this process (even killed by SIGKILL), so a lost Ray worker or pool leaves no builder behind."""
    folder = store.cell_dir(key)
    run_id, started = uuid.uuid4().hex, time.time()
    with open(folder / LOG_FILE, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "edgeq.matrix.worker", str(folder), run_id, repr(started),
                                    node],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   preexec_fn=die_with_parent)
    return Child(store, key, run_id, process, started, node)


def collect(child: Child) -> dict:
    """The result of a finished child: the one it wrote, or, when it died before writing one, a failed result that
    says how it died (written to the store, so the matrix goes on and --retry-failed finds it)."""
    code = child.process.wait()
    result = child.store.result(child.key)
    if result is not None and result.get("run") == child.run_id:
        return result
    if code == BUSY:
        return {"key": child.key, "status": "failed", "error": {
            "type": "DestinationBusyError", "message": "another worker is building this cell", "stage": "export",
            "hint": "wait for it to finish, or give this matrix another --out"}}
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
    error = {"type": "WorkerDied", "message": f"the worker process (pid {child.process.pid}) {how} before it "
             "finished; nothing of it is kept (packages are placed by one rename)", "stage": "export",
             "hint": "out of memory? (the cell declared its peak in cell.json); see its worker.log, then rerun it "
                     "with --retry-failed"}
    previous = child.store.result(child.key)
    kept = {"package": previous["package"]} if previous and child.store.package_intact(child.key, previous) else {}
    return finish(child.store, child.key, child.run_id, {"status": "failed", "error": error, **kept}, previous,
                  child.started, None, child.node)


def run_cell(cell_dir: str, node: str = "") -> dict:
    """Build one cell in a worker process and wait for it (what a Ray task runs)."""
    folder = Path(cell_dir)
    return collect(start_child(Store(folder.parent.parent), folder.name, node))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        return run(Path(args[0]), args[1], float(args[2]), args[3])
    except KeyboardInterrupt as exc:  # SIGINT, or SIGTERM/SIGHUP while the export runs: no result, built again
        return 128 + getattr(exc, "signum", signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
