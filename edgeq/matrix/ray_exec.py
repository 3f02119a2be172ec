"""The Ray executor (``--ray ADDRESS|auto``, the ``ray`` extra): each cell a Ray task on an existing cluster.

A task reserves the cell's declared peak memory (``memory=``, in bytes: Ray places it only on a node with that much
unreserved) and one CPU, plus a custom resource for what it needs beyond a plain CPU node: ``qnn_sim`` for QNN
profiles (the export compiles and runs on the HTP simulator) and ``qemu_arm64`` / ``qnn_sim`` for a device check.
Nodes offer them as ``ray start --resources='{"qemu_arm64": 1}'``. A cell no live node could ever take fails at
once with what it needs, instead of waiting forever in Ray's queue.

The task builds the cell the way the local pool does (``edgeq.matrix.worker.run_cell``: a worker process, result.json
in the store), so the store must be a folder every node reaches at the same path (NFS, CephFS, a bind mount), and the
models too; edgeq and its tools must be installed alike on every node (the worker refuses a cell whose inputs hash
differently on its node). A worker lost mid-cell (its process killed, its node gone) is retried by Ray up to
``max_retries`` times; its child dies with it and the next attempt starts clean.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from edgeq.errors import MissingExtraError, UserInputError
from edgeq.matrix.cells import Cell
from edgeq.matrix.events import Events
from edgeq.matrix.store import Store
from edgeq.matrix.worker import finish

MAX_RETRIES = 3  # Ray's default for tasks, stated: a cell outlives three lost workers
POLL_S = 1.0
RUNNING_SCAN_S = 5.0  # how often running.json files are counted for the progress line


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise MissingExtraError("--ray needs Ray (edgeq's 'ray' extra), which is not installed here",
                                "pip install 'edgeq[ray]' here and on every node of the cluster, or drop --ray to "
                                "build on this machine") from exc
    return ray


def cell_task(cell_dir: str) -> dict:
    """What one Ray task runs (a module-level function, so workers import it rather than unpickle code)."""
    import ray

    from edgeq.matrix.worker import run_cell

    return run_cell(cell_dir, ray.util.get_node_ip_address())


def needs(cell: Cell) -> dict[str, float]:
    return {"CPU": 1.0, "memory": float(cell.memory_mb * 2**20), **dict(cell.resources)}


def unmet(cell: Cell, nodes: list[dict]) -> str | None:
    """What no live node offers the cell (None when one does): 'memory 20480 MB, qemu_arm64'."""
    want = needs(cell)
    if any(all(n.get("Resources", {}).get(k, 0) >= v for k, v in want.items()) for n in nodes):
        return None
    return ", ".join(f"memory {cell.memory_mb} MB" if k == "memory" else k for k, v in want.items()
                     if not any(n.get("Resources", {}).get(k, 0) >= v for n in nodes)) or "these resources on one node"


@dataclass
class RayExecutor:
    address: str  # 'auto', or host:port of the cluster's head
    max_retries: int = MAX_RETRIES

    def describe(self) -> str:
        return f"the Ray cluster at {self.address}"

    def _connect(self, ray) -> bool:
        if ray.is_initialized():
            return False
        try:
            ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UserInputError(f"cannot connect to the Ray cluster at {self.address}: {exc}",
                                 "start one with 'ray start --head' (then --ray auto on that machine), or pass the "
                                 "address 'ray start --head' printed") from exc
        return True

    def run(self, cells: list[Cell], store: Store, events: Events) -> None:
        ray = import_ray()
        owned = self._connect(ray)
        pending: dict = {}
        try:
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            task = ray.remote(cell_task)
            for cell in cells:
                missing = unmet(cell, nodes)
                if missing:
                    events.finished(cell, self._failed(store, cell, "NoNodeFitsError", f"no live node of the cluster "
                                    f"offers {missing}", "start a node that does (ray start --resources="
                                    "'{\"qemu_arm64\": 1}' for arm64 device checks), or set the model's memory_mb"))
                    continue
                ref = task.options(num_cpus=1, memory=cell.memory_mb * 2**20, resources=dict(cell.resources),
                                   max_retries=self.max_retries, name=f"edgeq-matrix {cell.name}",
                                   ).remote(str(store.cell_dir(cell.key)))
                pending[ref] = cell
            scanned = 0.0
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
                for ref in done:
                    cell = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        result = self._failed(store, cell, type(exc).__name__, f"the cell's Ray task failed (after "
                                              f"up to {self.max_retries} retries of a lost worker): {exc}",
                                              "see the cell's worker.log and Ray's logs; rerun with --retry-failed")
                    events.finished(cell, result)
                if done or time.monotonic() - scanned >= RUNNING_SCAN_S:
                    scanned = time.monotonic()
                    events.set_running(sum(store.running(c.key) is not None for c in pending.values()))
                events.tick(None)
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            if owned:
                ray.shutdown()

    @staticmethod
    def _failed(store: Store, cell: Cell, kind: str, message: str, hint: str) -> dict:
        error = {"type": kind, "message": message[:2000], "hint": hint, "stage": "schedule"}
        return finish(store, cell.key, "", {"status": "failed", "error": error}, store.result(cell.key),
                      time.time(), None)
