"""The output store of a matrix: one folder per cell, named by the cell's key, on a disk every worker reaches.

```
OUT/cells/<key>/cell.json        what to build (the export request, device, declared memory, the key's inputs)
OUT/cells/<key>/<package>/       the package, with its zip inside: placed by one rename (edgeq.staging)
OUT/cells/<key>/result.json      the outcome, written last and atomically: ok with the package's numbers, or the
                                 error (message and hint)
OUT/cells/<key>/running.json     the worker building it now (pid, parent pid, node), removed when it is done
OUT/cells/<key>/worker.log       the worker's progress and, on a crash, its traceback
OUT/matrix.md, matrix.html, matrix.json   the summary
```

A killed worker leaves no half package (the pipeline builds in a staging folder and renames it into place) and no
result, so the cell is built again; the next worker on the cell removes the staging folder it left. One worker at a
time builds a cell: it holds flock on ``.cell-lock`` (the kernel drops it when the worker dies). flock is only as
good as the shared file system's locking (NFS v4 and CephFS honour it); a run of one matrix never starts a cell
twice at once in any case.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from edgeq.errors import DestinationBusyError
from edgeq.manifest import MANIFEST
from edgeq.matrix.cells import Cell
from edgeq.modelsource import sha256_file
from edgeq.report import write_atomic

CELLS = "cells"
CELL_FILE, RESULT_FILE, RUNNING_FILE, LOG_FILE, LOCK_FILE = "cell.json", "result.json", "running.json", "worker.log", \
    ".cell-lock"
RESULT_FORMAT = 1
HIT, FAILED, TODO = "cache hit", "failed", "to build"


def write_json(path: Path, data: dict) -> Path:
    return write_atomic(path, json.dumps(data, indent=1) + "\n")


def read_json(path: Path) -> dict | None:
    """A store file, or None when it is missing or unreadable (a cell with a torn or foreign file is built again)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def package_files(folder: Path) -> dict[str, int]:
    """Every file of a package folder (its zip too) with its size."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


def package_record(folder: Path) -> dict:
    """What result.json keeps of a placed package: enough to tell later, without rehashing gigabytes, that it is
    still the package that was verified (its manifest holds every other file's sha256; sizes catch a torn copy)."""
    return {"name": folder.name, "files": package_files(folder), "manifest_sha256": sha256_file(folder / MANIFEST)}


class Store:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.cells = self.root / CELLS

    def cell_dir(self, key: str) -> Path:
        return self.cells / key

    def write_cell(self, cell: Cell) -> Path:
        """cell.json, rewritten only when it changed: a cell found built leaves the store as it was."""
        folder = self.cell_dir(cell.key)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / CELL_FILE
        if read_json(path) != json.loads(json.dumps(cell.to_dict())):
            write_json(path, cell.to_dict())
        return folder

    def result(self, key: str) -> dict | None:
        data = read_json(self.cell_dir(key) / RESULT_FILE)
        return data if data and data.get("format") == RESULT_FORMAT and data.get("key") == key else None

    def package_intact(self, key: str, result: dict | None) -> bool:
        """The package the result names is in the cell's folder with the files, sizes and manifest it had."""
        record = (result or {}).get("package")
        if not record:
            return False
        folder = self.cell_dir(key) / record["name"]
        try:
            return (folder.is_dir() and package_files(folder) == record["files"]
                    and sha256_file(folder / MANIFEST) == record["manifest_sha256"])
        except OSError:
            return False

    def state(self, cell: Cell) -> tuple[str, dict | None]:
        """HIT (a verified package, device-checked when the cell asks for it), FAILED (its error recorded) or TODO
        (never built, interrupted, its package gone, or a device check still to run)."""
        result = self.result(cell.key)
        if result is None:
            return TODO, None
        if result["status"] == "failed":
            return FAILED, result
        device = result.get("device") or {}
        if not self.package_intact(cell.key, result) or (cell.device and device.get("target") != cell.device):
            return TODO, result
        return HIT, result

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """The cell is this process's until the block ends (DestinationBusyError if another process has it)."""
        folder = self.cell_dir(key)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DestinationBusyError(f"cell {folder} is being built by another worker",
                                           "wait for it to finish, or give this matrix another --out") from None
            yield
        finally:
            os.close(fd)

    def clean_staging(self, key: str) -> list[Path]:
        """Remove what a killed worker left (staging folders, the export's lock file); call with the lock held."""
        folder = self.cell_dir(key)
        left = [p for p in folder.iterdir() if p.name.startswith(".edgeq-") or p.name.endswith(".edgeq-lock")]
        for p in left:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        return left

    def mark_running(self, key: str, info: dict) -> None:
        write_json(self.cell_dir(key) / RUNNING_FILE, info)

    def running(self, key: str) -> dict | None:
        return read_json(self.cell_dir(key) / RUNNING_FILE)

    def clear_running(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.cell_dir(key) / RUNNING_FILE).unlink()

    def write_result(self, key: str, result: dict) -> dict:
        write_json(self.cell_dir(key) / RESULT_FILE, {"format": RESULT_FORMAT, "key": key, **result})
        return self.result(key)
