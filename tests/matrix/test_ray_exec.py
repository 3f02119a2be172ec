"""The Ray executor: what a cell asks of the cluster, and (slow) a 2-node Ray cluster on loopback building
2 tiny BERTs x 3 profiles: packages byte-identical to the local executor's, a worker killed by its PID mid-run
retried by Ray, a rerun all cache hits. Skipped, saying why, where the ray extra is not installed."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeq.errors import MissingExtraError
from edgeq.matrix.cells import Cell
from edgeq.matrix.local import LocalExecutor
from edgeq.matrix.ray_exec import import_ray, needs, unmet
from edgeq.matrix.run import run_matrix
from edgeq.matrix.store import RUNNING_FILE
from edgeq.pipeline import ExportRequest
from matrix.conftest import matrix_file, snapshot
from matrix.ray_cluster import RayCluster, ray_cli, ray_env

NO_RAY = "needs the 'ray' extra (pip install 'edgeq[ray]'), which is not installed"
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None or ray_cli() is None, reason=NO_RAY)
PROFILES = ("android-arm64", "ios-arm64", "linux-arm64")
RUN_TIMEOUT_S = 900


def cell(memory_mb: int, resources=()) -> Cell:
    return Cell("0" * 64, "m-p", "m", "p", ExportRequest(Path("m"), "p"), None, memory_mb, tuple(resources))


def node(**resources: float) -> dict:
    return {"Alive": True, "Resources": {"CPU": 1.0, **resources}}


def test_a_cell_asks_for_a_cpu_its_memory_and_its_resources():
    c = cell(1500, [("qemu_arm64", 1.0)])
    assert needs(c) == {"CPU": 1.0, "memory": 1500 * 2**20, "qemu_arm64": 1.0}
    assert unmet(c, [node(memory=2e9, qemu_arm64=1.0)]) is None
    assert unmet(c, [node(memory=2e9), node(memory=1e9, qemu_arm64=1.0)]) == "these resources on one node"
    assert unmet(c, [node(memory=1e9)]) == "memory 1500 MB, qemu_arm64"


def test_without_ray_the_flag_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # what an interpreter without the extra imports
    with pytest.raises(MissingExtraError, match="--ray needs Ray") as info:
        import_ray()
    assert "pip install 'edgeq[ray]'" in info.value.hint


# ---------------------------------------------------------------------------------------------------- the cluster

@pytest.fixture(scope="module")
def cluster():
    c = RayCluster()
    t0 = time.monotonic()
    try:
        yield c.start(), time.monotonic() - t0
    finally:
        c.stop()
        assert c.processes() == []  # every process the two 'ray start' left is gone
        import shutil

        shutil.rmtree(c.root, ignore_errors=True)


def matrix_command(path: Path, out: Path, address: str, during=lambda: None) -> tuple[int, str, object]:
    """``edgeq matrix PATH -o OUT --ray ADDRESS`` as a user runs it: (exit status, output, what ``during`` returned
    while it ran). A failed step never leaves the driver running."""
    command = subprocess.Popen([sys.executable, "-c", "from edgeq.cli import main; main()", "matrix", str(path), "-o",
                                str(out), "--ray", address], env=ray_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        seen = during()
        output, _ = command.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if command.poll() is None:
            command.kill()
            command.wait()
    return command.returncode, output, seen


def kill_a_ray_worker(out: Path, deadline: float) -> tuple[str, int]:
    """The first cell seen building: SIGKILL the Ray worker running its task (its worker process's parent)."""
    while time.monotonic() < deadline:
        for running in sorted((out / "cells").glob(f"*/{RUNNING_FILE}")) if (out / "cells").is_dir() else []:
            info = json.loads(running.read_text())
            os.kill(info["parent_pid"], signal.SIGKILL)
            return running.parent.name, info["parent_pid"]
        time.sleep(0.05)
    raise AssertionError("no cell started on the cluster")


@pytest.mark.slow
@needs_ray
@pytest.mark.encoders
def test_a_two_node_cluster_builds_the_local_executors_bytes_survives_a_killed_worker_and_reruns_nothing(
        cluster, matrix_models, tmp_path):
    ray_cluster, start_s = cluster
    path = matrix_file(tmp_path / "matrix.toml", [str(matrix_models / "bert-a"), str(matrix_models / "bert-b")],
                       PROFILES)
    timings = {"cluster start": start_s}
    t0 = time.monotonic()
    local = run_matrix(path, tmp_path / "local", LocalExecutor(jobs=2))
    timings["local executor, 6 cells"] = time.monotonic() - t0
    assert not local.not_ok

    t0 = time.monotonic()
    code, output, (key, killed) = matrix_command(path, tmp_path / "ray", ray_cluster.address,
                                                 lambda: kill_a_ray_worker(tmp_path / "ray", t0 + RUN_TIMEOUT_S))
    timings["ray, 6 cells, one worker killed"] = time.monotonic() - t0
    assert code == 0, output
    assert "0 cache hits" in output and "6 to build on the Ray cluster" in output

    results = {d.name: json.loads((d / "result.json").read_text()) for d in (tmp_path / "ray" / "cells").iterdir()}
    assert set(results) == {c.key for c in local.cells}  # the same cells, by the same keys
    assert all(r["status"] == "ok" for r in results.values())
    assert results[key]["parent_pid"] != killed  # built by another Ray worker: Ray retried the task
    assert {r["node"] for r in results.values()} == {"127.0.0.2", "127.0.0.3"}  # both nodes built cells
    for c in local.cells:  # every package byte for byte the local executor's, its zip included
        name = c.name
        assert snapshot_bytes(tmp_path / "ray" / "cells" / c.key / name) == \
            snapshot_bytes(tmp_path / "local" / "cells" / c.key / name), name

    before = snapshot(tmp_path / "ray" / "cells")
    t0 = time.monotonic()
    code, output, _ = matrix_command(path, tmp_path / "ray", ray_cluster.address)
    timings["ray rerun"] = time.monotonic() - t0
    assert code == 0, output
    assert "6 cache hits" in output and "0 to build" in output and "started" not in output
    assert snapshot(tmp_path / "ray" / "cells") == before
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))


def snapshot_bytes(folder: Path) -> dict[str, bytes]:
    return {k: v[0] for k, v in snapshot(folder).items()}
