"""manifest.json: what a package holds and exactly how it was made. ``SCHEMA_VERSION`` bumps on breaking change."""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path

from edgeq.errors import VerificationError
from edgeq.modelsource import sha256_file

SCHEMA_VERSION = 1
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


def file_entries(folder: Path) -> dict[str, dict]:
    """sha256 and size of every file in the package folder except the manifest itself."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST:
            out[p.relative_to(folder).as_posix()] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return out


def write_manifest(folder: Path, manifest: dict) -> Path:
    path = folder / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise VerificationError(f"{folder} has no {MANIFEST}", "pass a package folder written by 'edgeq export'")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise VerificationError(f"{path} is not valid JSON: {exc}", "re-export the package") from exc
    if not isinstance(manifest, dict):
        raise VerificationError(f"{path} does not hold a JSON object", "re-export the package")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise VerificationError(f"{path}: schema_version {manifest.get('schema_version')!r}, this edgeq reads {SCHEMA_VERSION}",
                                "use the edgeq version that wrote the package, or re-export it")
    return manifest
