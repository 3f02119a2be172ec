"""Older manifests, read through a migration to the current schema (edgeq/manifest_schema.py).

Each step takes the JSON of one version to the next, changing only what that version changed, so that the typed
reader then checks the result like any current manifest. A step never trusts the old JSON's shape: where a field it
rewrites is missing or of the wrong type it leaves it alone, and the typed reader names it.

v1 -> v2: the ``recipe`` discriminator, from ``source.kind`` and ``model.execution_provider`` (readers used to guess
it from keys such as "qnn" in the manifest); ``source.name`` from ``source.path`` where only the path was recorded
(the path is kept: an older package's rebuild and eval find the source there).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import PurePosixPath, PureWindowsPath

from edgeq.errors import PackageError
from edgeq.manifest_schema import CAUSAL_LM, ENCODER_CPU, ENCODER_QNN, KINDS, REEXPORT, SCHEMA_VERSION
from edgeq.profiles import QNN_EP


def _v1_to_v2(m: dict, where: object) -> dict:
    source = m.get("source") if isinstance(m.get("source"), dict) else {}
    model = m.get("model") if isinstance(m.get("model"), dict) else {}
    kind = source.get("kind")
    if isinstance(kind, str) and kind not in KINDS:
        raise PackageError(f"{where} is malformed: source.kind {kind!r} is not one of {', '.join(KINDS)}", REEXPORT)
    out = {"schema_version": 2}
    if kind == "causal-lm":
        out["recipe"] = CAUSAL_LM
    elif kind == "encoder":
        out["recipe"] = ENCODER_QNN if model.get("execution_provider") == QNN_EP or "qnn" in m else ENCODER_CPU
    out.update((k, v) for k, v in m.items() if k != "schema_version")
    path = source.get("path")
    if "name" not in source and isinstance(path, str):
        out["source"] = {"name": _folder_name(path), **source}
    return out


def _folder_name(path: str) -> str:
    """The last part of a recorded local path, whichever system wrote it."""
    return (PureWindowsPath(path) if "\\" in path else PurePosixPath(path)).name


# version -> the step to the next one
STEPS: dict[int, Callable[[dict, object], dict]] = {1: _v1_to_v2}
READABLE = (*STEPS, SCHEMA_VERSION)


def migrate(manifest: dict, where: object) -> dict:
    """``manifest`` (JSON of any version this edgeq reads) as current-schema JSON; PackageError for another
    version. The input is not changed."""
    version = manifest.get("schema_version")
    if not (isinstance(version, int) and not isinstance(version, bool) and version in READABLE):
        raise PackageError(f"{where}: schema_version {version!r}, this edgeq reads "
                           f"{', '.join(map(str, READABLE))} (the current one is {SCHEMA_VERSION})",
                           "use the edgeq version that wrote the package, or re-export it")
    while version != SCHEMA_VERSION:
        manifest = STEPS[version](manifest, where)
        version += 1
    return manifest
