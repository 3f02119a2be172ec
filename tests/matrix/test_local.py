"""The local executor end to end on tiny BERTs: [bert-a, bert-nan] x [android-arm64, ios-arm64], two jobs.

First run: bert-a's android cell is built and verified; its ios cell's worker is killed by its PID mid-run; both
bert-nan cells fail in the checkpoint check. The others go on and every failure is recorded with its message and
hint. Second run: no work, the store unchanged byte for byte. --retry-failed: only the three failed cells run; the
killed one is built, the NaN ones fail again. Last run: no work again. Then the memory admission of the pool."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.devices.arm64 import DEFAULT_CACHE, ensure_runtime
from edgeq.errors import DeviceUnavailableError
from edgeq.manifest import read_manifest
from edgeq.matrix.local import LocalExecutor, available_memory_mb
from edgeq.matrix.run import run_matrix
from edgeq.matrix.store import RUNNING_FILE
from edgeq.matrix.worker import run_cell
from edgeq.progress import Progress
from edgeq.stages.verify import verify
from matrix.conftest import matrix_file, snapshot

pytestmark = pytest.mark.encoders  # every cell exports a BERT through optimum-onnx

PROFILES = ("android-arm64", "ios-arm64")
KILLED = "bert-a-ios-arm64"
KILL_WAIT_S = 300


def cell_dirs(out: Path) -> dict[str, Path]:
    """cell name -> its folder in the store."""
    return {json.loads((d / "cell.json").read_text())["name"]: d for d in (out / "cells").iterdir()
            if (d / "cell.json").is_file()}


def kill_when_running(out: Path, name: str) -> int:
    """Wait for the cell's worker to start building (its running.json) and SIGKILL it; its PID."""
    deadline = time.monotonic() + KILL_WAIT_S
    while time.monotonic() < deadline:
        folder = cell_dirs(out).get(name) if (out / "cells").is_dir() else None
        running = folder / RUNNING_FILE if folder else None
        if running and running.is_file():
            pid = json.loads(running.read_text())["pid"]
            os.kill(pid, signal.SIGKILL)
            return pid
        time.sleep(0.05)
    raise AssertionError(f"{name} never started")


def run(path: Path, out: Path, retry_failed: bool = False, jobs: int = 2, memory_mb: int | None = None):
    stream = io.StringIO()
    result = run_matrix(path, out, LocalExecutor(jobs, memory_mb), retry_failed, Progress(stream=stream))
    return result, stream.getvalue()


@pytest.fixture(scope="module")
def matrix(matrix_models, tmp_path_factory) -> tuple[Path, Path]:
    """(the matrix file, its store)."""
    folder = tmp_path_factory.mktemp("local-matrix")
    models = [str(matrix_models / "bert-a"), str(matrix_models / "bert-nan")]
    return matrix_file(folder / "matrix.toml", models, PROFILES), folder / "out"


@pytest.fixture(scope="module")
def first(matrix):
    path, out = matrix
    outcome: dict = {}
    worker = threading.Thread(target=lambda: outcome.update(zip(("run", "log"), run(path, out))))
    worker.start()
    killed = kill_when_running(out, KILLED)
    worker.join()
    return outcome["run"], outcome["log"], killed, {n: json.loads((d / "result.json").read_text())
                                                     for n, d in cell_dirs(out).items()}


@pytest.fixture(scope="module")
def second(first, matrix):
    path, out = matrix
    before = snapshot(out / "cells")
    run_, log = run(path, out)
    return run_, log, before, snapshot(out / "cells")


@pytest.fixture(scope="module")
def retried(second, matrix):
    path, out = matrix
    before = snapshot(out / "cells")
    run_, log = run(path, out, retry_failed=True)
    return run_, log, before, snapshot(out / "cells")


@pytest.fixture(scope="module")
def last(retried, matrix):
    path, out = matrix
    before = snapshot(out / "cells")
    result = CliRunner().invoke(main, ["matrix", str(path), "-o", str(out), "-q"])
    return result, before, snapshot(out / "cells")


def test_a_built_cell_holds_a_verified_package_and_its_numbers(first, matrix):
    run_, log, _, results = first
    r = results["bert-a-android-arm64"]
    package = cell_dirs(matrix[1])["bert-a-android-arm64"] / "bert-a-android-arm64"
    assert r["status"] == "ok" and r["attempts"] == 1 and verify(package).ok
    m = read_manifest(package)
    assert (r["size_bytes"], r["accuracy"], r["kind"]) == (m.model_bytes(), m.accuracy.numbers(), "encoder")
    assert r["seconds"] > 1 and 100 < r["peak_rss_mb"] < 4000  # this process's peak: a tiny BERT's export
    assert m.profile.overrides["quantization.calibration_samples"] == 16  # the matrix's set, as export --set takes it
    assert "bert-a-android-arm64: ok in" in log and "4/4 done" not in log.split("started")[0]


def test_a_failed_cell_records_its_message_and_hint_and_the_others_go_on(first, matrix):
    _, log, _, results = first
    for name in ("bert-nan-android-arm64", "bert-nan-ios-arm64"):
        e = results[name]["error"]
        assert results[name]["status"] == "failed" and e["type"] == "ModelFolderError" and e["stage"] == "export"
        assert "NaN or Inf" in e["message"] and e["hint"]
        assert not (cell_dirs(matrix[1])[name] / name).exists()  # no package
    assert f"{KILLED}: FAILED (WorkerDied)" in log and "4/4 done, 0 running, 3 failed" in log


def test_a_killed_worker_fails_its_cell_and_leaves_no_package(first, matrix):
    _, _, killed, results = first
    e = results[KILLED]["error"]
    assert e["type"] == "WorkerDied" and f"(pid {killed}) was killed by SIGKILL" in e["message"]
    assert "--retry-failed" in e["hint"]
    assert not (cell_dirs(matrix[1])[KILLED] / KILLED).exists()


def test_the_summary_has_a_row_per_cell(first, matrix):
    out = matrix[1]
    md = (out / "matrix.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| bert-")]
    assert len(rows) == 4 + 1  # the cells, and the built package in edgeq report's table
    assert re.search(r"\| bert-a-android-arm64 \| ok \| 0\.\d \| mean cosine 1\.0000\d, min [\d.]+ \| — \| "
                     r"\d+ \| \d+ \| no \|", md)
    assert "| bert-nan-ios-arm64 | FAILED, export: ModelFolderError: " in md and "(hint: " in md
    assert "<table>" in (out / "matrix.html").read_text()
    data = json.loads((out / "matrix.json").read_text())
    assert [c["name"] for c in data["cells"]] == ["bert-a-android-arm64", "bert-a-ios-arm64", "bert-nan-android-arm64",
                                                   "bert-nan-ios-arm64"]


def test_a_second_run_does_no_work_and_changes_nothing(second):
    run_, log, before, after = second
    assert run_.built == set() and len(run_.hits) == 1 and "1 cache hits, 3 failed before (kept: " in log
    assert after == before  # every file of the store, bytes and mtimes
    assert "started" not in log


def test_retry_failed_reruns_only_the_failed_cells(retried, first):
    run_, log, before, after = retried
    results = run_.results
    names = {c.key: c.name for c in run_.cells}
    assert {names[k] for k in run_.built} == {KILLED, "bert-nan-android-arm64", "bert-nan-ios-arm64"}
    assert log.count(": started") == 3
    by_name = {names[k]: r for k, r in results.items()}
    assert by_name[KILLED]["status"] == "ok" and by_name[KILLED]["attempts"] == 2
    assert by_name["bert-nan-ios-arm64"]["status"] == "failed" and by_name["bert-nan-ios-arm64"]["attempts"] == 2
    kept = {k: v for k, v in before.items() if "bert-a-android-arm64" in k or k.split("/")[0] in
            {k2 for k2, n in names.items() if n == "bert-a-android-arm64"}}
    assert kept and all(after[k] == v for k, v in kept.items())  # the built cell untouched
    assert not any("/.edgeq-" in k for k in after)  # the killed worker's staging folder removed


def test_a_last_run_does_no_work_and_the_command_exits_1_for_the_failed_cells(last):
    result, before, after = last
    assert after == before
    assert result.exit_code == 1
    assert "error: 2 of 4 cells are not ok: bert-nan-android-arm64, bert-nan-ios-arm64" in result.output
    assert "hint: their errors are in" in result.output


@pytest.fixture(scope="module")
def device_only(last, matrix):
    """The built cell asked for a device check afterwards (the host target: the device stage as arm64 runs it, in
    seconds): its worker checks the package in place."""
    folder = cell_dirs(matrix[1])["bert-a-android-arm64"]
    cell = json.loads((folder / "cell.json").read_text())
    (folder / "cell.json").write_text(json.dumps({**cell, "device": "host"}))
    before = snapshot(folder / "bert-a-android-arm64")
    result = run_cell(str(folder))
    return result, before, snapshot(folder / "bert-a-android-arm64"), (folder / "worker.log").read_text()


def test_a_device_check_on_a_built_package_does_not_export_it_again(device_only):
    result, before, after, log = device_only
    assert result["status"] == "ok" and result["attempts"] == 2
    assert result["device"]["target"] == "host" and result["device"]["ok"]
    assert after == before and "export:" not in log  # the package as it was: checked, not rebuilt


@pytest.mark.device
def test_a_device_check_runs_the_package_on_its_profiles_device(matrix_models, tmp_path):
    try:
        ensure_runtime(DEFAULT_CACHE)
    except DeviceUnavailableError as exc:
        pytest.skip(f"arm64 runtime cannot be built here, apt is unavailable: {exc.message} ({exc.hint})")
    path = matrix_file(tmp_path / "m.toml", [str(matrix_models / "bert-a")], ("android-arm64",),
                       top="device_check = true\n")
    run_, log = run(path, tmp_path / "out")
    (c,) = run_.cells
    r = run_.results[c.key]
    assert c.device == "arm64" and dict(c.resources) == {"qemu_arm64": 1.0}  # what a Ray node must offer
    assert r["status"] == "ok" and r["device"]["target"] == "arm64" and r["device"]["ok"], r
    assert any("within the accuracy budget" in name for name, _, _ in r["device"]["checks"])
    assert "checked on arm64" in log


def concurrency(log: str) -> int:
    """The most cells running at once, from the progress lines."""
    running = peak = 0
    for line in log.splitlines():
        if ": started (" in line:
            running += 1
            peak = max(peak, running)
        elif re.search(r": (ok in|FAILED \(ModelFolderError\))", line):
            running -= 1
    return peak


def test_the_pool_starts_only_what_fits_its_memory(matrix_models, tmp_path):
    """Two jobs, a 1500 MB budget: the NaN model's cells (1000 MB each) run one at a time; bert-a's (declared
    5000 MB) fail at once without a worker."""
    path = matrix_file(tmp_path / "m.toml", [f'path = "{matrix_models / "bert-nan"}"\nmemory_mb = 1000',
                                             f'path = "{matrix_models / "bert-a"}"\nmemory_mb = 5000'], PROFILES)
    run_, log = run(path, tmp_path / "out", jobs=2, memory_mb=1500)
    assert concurrency(log) == 1 and log.count(": started") == 2
    by_name = {c.name: run_.results[c.key] for c in run_.cells}
    for c in run_.cells[2:]:  # bert-a's
        e = by_name[c.name]["error"]
        assert e["type"] == "MemoryBudgetError" and "declares a peak of 5000 MB" in e["message"]
        assert "memory_mb" in e["hint"] and not (tmp_path / "out" / "cells" / c.key / "worker.log").exists()
    assert by_name["bert-nan-ios-arm64"]["error"]["type"] == "ModelFolderError"


def test_available_memory_reads_memavailable(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:   20480000 kB\n")
    assert available_memory_mb(meminfo) == 20000
    assert available_memory_mb(tmp_path / "none") > 0
