"""manifest.json: what a package holds and exactly how it was made. ``SCHEMA_VERSION`` bumps on breaking change.

A package comes from anyone (a hub, a colleague, an app bundle), and its manifest is not hashed: reading one trusts
nothing in it. :func:`read_manifest` is the one reader every command uses: it refuses a folder holding a symlink or
a special file, migrates an older manifest (edgeq/manifest_migrate.py) and returns the typed record
(edgeq/manifest_schema.py), refusing a manifest that lacks a field or holds one of the wrong type;
:func:`package_path` is the one way a path the manifest names becomes a file, and it stays inside the folder.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from edgeq.errors import EdgeqError, PackageError
from edgeq.manifest_migrate import migrate
from edgeq.manifest_schema import (CAUSAL_LM, ENCODER_CPU, ENCODER_QNN, REEXPORT, SCHEMA_VERSION, Manifest,
                                   plain_relative_path)
from edgeq.modelsource import sha256_file
from edgeq.safe_load import refuse_code

__all__ = ["CAUSAL_LM", "ENCODER_CPU", "ENCODER_QNN", "MANIFEST", "REEXPORT", "SCHEMA_VERSION", "Manifest",
           "checked_manifest", "file_entries", "model_path", "package_path", "plain_relative_path", "read_manifest",
           "read_package_json", "stored_rows", "tool_versions", "write_manifest"]
MANIFEST = "manifest.json"
TOOLS = ("edgeq", "onnx", "onnxruntime", "optimum-onnx", "optimum", "transformers", "torch", "numpy")


def stored_rows(a) -> list[list[float]]:
    """Pooled outputs as the manifest stores them: 7 decimals, far below any bar verify applies."""
    return [[round(float(x), 7) for x in row] for row in a]


def tool_versions() -> dict[str, str]:
    out = {}
    for name in TOOLS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _walk(folder: Path) -> Iterator[Path]:
    """Every regular file under ``folder``, sorted, never following a symlink. A package edgeq writes holds only
    regular files and folders, so a symlink anywhere in it (to a file inside or outside, or to a folder) and any
    special file (a FIFO would hang the hash) is refused: a link could point verify, run or eval at a model, or a
    hash at a file, that is not the package's."""
    for root, dirs, files in os.walk(folder, followlinks=False):
        dirs.sort()
        files.sort()
        for name in dirs + files:
            path = Path(root) / name
            mode = path.lstat().st_mode
            rel = path.relative_to(folder).as_posix()
            if stat.S_ISLNK(mode):
                raise PackageError(f"{folder} holds a symlink, {rel} -> {os.readlink(path)}: a package must hold "
                                   "only its own files", REEXPORT)
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise PackageError(f"{folder} holds {rel}, which is not a regular file or folder", REEXPORT)
        yield from (Path(root) / name for name in files)


def file_entries(folder: Path) -> dict[str, dict]:
    """sha256 and size of every file in the package folder except the manifest itself (symlinks refused)."""
    folder = Path(folder)
    out = {}
    for p in sorted(_walk(folder), key=lambda p: p.relative_to(folder).as_posix()):
        rel = p.relative_to(folder).as_posix()
        if rel != MANIFEST:
            out[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return out


def package_path(folder: Path, relative: object, what: str = "the manifest's file") -> Path:
    """The file ``relative`` (as the manifest names it) in the package ``folder``. Every path a command opens in a
    package goes through here: a plain relative path with no symlink on the way (``what`` names it in errors)."""
    folder = Path(folder)
    path = folder
    for part in plain_relative_path(relative, what).parts:
        path = path / part
        if path.is_symlink():
            raise PackageError(f"{what} {relative!r} goes through the symlink {path}", REEXPORT)
    if not path.resolve().is_relative_to(folder.resolve()):  # cannot happen after the checks above; kept as a guard
        raise PackageError(f"{what} {relative!r} leaves {folder}", REEXPORT)
    return path


def model_path(folder: Path, manifest: Manifest) -> Path:
    """The package's model file (``model.file``), through ``package_path``."""
    return package_path(folder, manifest.model.file, "the manifest's model.file")


def write_manifest(folder: Path, manifest: dict) -> Path:
    path = folder / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read_package_json(path: Path) -> object:
    """A JSON file of a package (a stranger's): PackageError if it does not parse, however deeply nested."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise PackageError(f"{path} is not valid JSON: {exc}", REEXPORT) from exc


def read_manifest(folder: Path) -> Manifest:
    """The typed manifest of the package ``folder`` (an older one migrated), checked: the folder holds no symlink or
    special file, the JSON has every field the schema types (edgeq/manifest_schema.py) with its type, and every path
    it names is plain. PackageError (exit 2) otherwise. Whether the files and outputs match is verify's business."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PackageError(f"package folder {folder} {'is not a folder' if folder.exists() else 'does not exist'}",
                           "pass a package folder written by 'edgeq export' (OUT/<model>-<profile>)")
    for _ in _walk(folder):  # symlinks and special files first: refuse_code reads every JSON file (a FIFO hangs)
        pass
    refuse_code(folder, "package")  # before anything (a tokenizer load) could import a package's Python
    path = folder / MANIFEST
    if not path.is_file():
        raise PackageError(f"{folder} has no {MANIFEST}", "pass a package folder written by 'edgeq export'")
    data = read_package_json(path)
    if not isinstance(data, dict):
        raise PackageError(f"{path} does not hold a JSON object", REEXPORT)
    return Manifest.from_dict(migrate(data, path), path)


def checked_manifest(manifest: dict, folder: Path) -> dict:
    """``manifest`` as the schema writes it, or EdgeqError: the writers' check that what they record is what every
    reader takes (an export that breaks the schema is an edgeq bug, not the user's)."""
    try:
        # checked as JSON, as a reader meets it (a writer's tuple is a JSON list)
        return Manifest.from_dict(json.loads(json.dumps(manifest)), folder / MANIFEST).to_dict()
    except PackageError as exc:
        raise EdgeqError(f"edgeq wrote a manifest its own schema refuses: {exc.message}",
                         "this is an edgeq bug; please report it with the command line") from exc
