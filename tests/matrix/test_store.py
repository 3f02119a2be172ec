"""The store: a cell's state read from its folder (cache hit only for an intact, verified package), one worker per
cell (flock), what a killed worker left removed, and nothing rewritten that did not change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeq.errors import DestinationBusyError
from edgeq.matrix.cells import Cell
from edgeq.matrix.store import FAILED, HIT, TODO, Store, package_record
from edgeq.pipeline import ExportRequest


def cell(tmp_path: Path, device: str | None = None) -> Cell:
    return Cell("ab" * 32, "m-android-arm64", "m", "android-arm64", ExportRequest(tmp_path / "m", "android-arm64"),
                device, 1500)


def placed(store: Store, c: Cell) -> Path:
    """A package-shaped folder in the cell's folder (the store only sizes and hashes it)."""
    folder = store.write_cell(c) / c.name
    folder.mkdir()
    (folder / "manifest.json").write_text('{"files": {}}\n')
    (folder / "model.ort").write_bytes(b"\0" * 100)
    return folder


def test_a_cell_is_a_hit_only_with_its_package_intact(tmp_path):
    store, c = Store(tmp_path / "out"), cell(tmp_path)
    assert store.state(c) == (TODO, None)
    folder = placed(store, c)
    store.write_result(c.key, {"status": "ok", "package": package_record(folder)})
    assert store.state(c)[0] == HIT
    (folder / "model.ort").write_bytes(b"\0" * 99)  # a torn copy
    assert store.state(c)[0] == TODO
    (folder / "model.ort").write_bytes(b"\0" * 100)
    (folder / "manifest.json").write_text('{"files": {"x": 1}}\n')  # same size, other bytes
    assert store.state(c)[0] == TODO


def test_a_failed_cell_stays_failed_and_a_missing_device_check_is_work(tmp_path):
    store, c = Store(tmp_path / "out"), cell(tmp_path)
    folder = placed(store, c)
    store.write_result(c.key, {"status": "failed", "error": {"message": "x"}})
    assert store.state(c)[0] == FAILED
    store.write_result(c.key, {"status": "ok", "package": package_record(folder), "device": None})
    assert store.state(cell(tmp_path, device="arm64"))[0] == TODO  # built, not yet checked on the device
    store.write_result(c.key, {"status": "ok", "package": package_record(folder), "device": {"target": "arm64"}})
    assert store.state(cell(tmp_path, device="arm64"))[0] == HIT


def test_a_result_of_another_key_or_format_is_not_this_cells(tmp_path):
    store, c = Store(tmp_path / "out"), cell(tmp_path)
    store.write_cell(c)
    (store.cell_dir(c.key) / "result.json").write_text(json.dumps({"format": 1, "key": "cd" * 32, "status": "ok"}))
    assert store.result(c.key) is None
    (store.cell_dir(c.key) / "result.json").write_text("{torn")
    assert store.state(c) == (TODO, None)


def test_one_worker_at_a_time_holds_a_cell(tmp_path):
    store, c = Store(tmp_path / "out"), cell(tmp_path)
    store.write_cell(c)
    with store.lock(c.key):
        with pytest.raises(DestinationBusyError, match="being built by another worker"):
            with store.lock(c.key):
                pass
    with store.lock(c.key):  # released
        pass


def test_what_a_killed_worker_left_is_removed_and_nothing_else(tmp_path):
    store, c = Store(tmp_path / "out"), cell(tmp_path)
    folder = store.write_cell(c)
    (folder / ".edgeq-k2j3" / "work").mkdir(parents=True)
    (folder / f".{c.name}.edgeq-lock").write_text("123\n")
    (folder / "worker.log").write_text("log")
    removed = store.clean_staging(c.key)
    assert sorted(p.name for p in removed) == [".edgeq-k2j3", f".{c.name}.edgeq-lock"]
    assert sorted(p.name for p in folder.iterdir()) == ["cell.json", "worker.log"]


def test_cell_json_is_not_rewritten_when_it_did_not_change(tmp_path):
    store, c = Store(tmp_path / "out"), cell(tmp_path)
    path = store.write_cell(c) / "cell.json"
    before = path.stat().st_mtime_ns, path.read_bytes()
    store.write_cell(c)
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before
    assert json.loads(path.read_text())["request"]["model_dir"] == str(tmp_path / "m")
