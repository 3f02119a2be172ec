"""manifest.json: what a package holds and exactly how it was made. ``SCHEMA_VERSION`` bumps on breaking change.

A package comes from anyone (a hub, a colleague, an app bundle), and its manifest is not hashed: reading one trusts
nothing in it. :func:`read_manifest` refuses a folder holding a symlink or a special file, and a manifest that lacks
the fields the commands read; :func:`package_path` is the one way a path the manifest names becomes a file, and it
stays inside the folder.
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path, PurePosixPath

from edgeq.errors import PackageError
from edgeq.modelsource import sha256_file
from edgeq.safe_load import refuse_code

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REEXPORT = "re-export the package with 'edgeq export' (or get it again from whoever made it)"
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


def plain_relative_path(name: object, what: str) -> PurePosixPath:
    """``name`` as a relative POSIX path in canonical form, nothing else: no absolute path, no '.' or '..' part,
    no backslash, no empty part."""
    ok = isinstance(name, str) and name and "\\" not in name and "\x00" not in name
    if ok:
        rel = PurePosixPath(name)
        ok = not rel.is_absolute() and rel.as_posix() == name and not {".", ".."} & set(name.split("/"))
    if not ok:
        raise PackageError(f"{what} {name!r} is not a plain path inside the package "
                           "(absolute, '..' or '.' parts and backslashes are refused)", REEXPORT)
    return rel


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


def write_manifest(folder: Path, manifest: dict) -> Path:
    path = folder / MANIFEST
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------------- the schema
# The fields the commands read, as (dotted key, type), checked when a package is read so that no command meets a
# KeyError or TypeError in a stranger's manifest. Issue 12 turns the manifest into typed dataclasses; until then
# these tables are its schema. Types: JSON ones, or NUMBER (finite, not bool), COUNT (int >= 1), IDS (list of ints).
NUMBER, COUNT, IDS = "a finite number", "a positive integer", "a list of integers"
Field = tuple[str, object]
CORE_FIELDS: tuple[Field, ...] = (
    ("files", dict), ("model", dict), ("model.file", str), ("profile", dict), ("profile.name", str),
    ("profile.values", dict), ("source", dict), ("source.kind", str), ("verification", dict))
KIND_FIELDS: dict[str, tuple[Field, ...]] = {  # what verify reads, by source.kind
    "encoder": (("verification.inputs", dict), ("verification.inputs.attention_mask", list),
                ("verification.pooling", str), ("verification.reference_pooled", list),
                ("verification.min_cosine", NUMBER), ("verification.max_rel_diff", NUMBER)),
    "causal-lm": (("model.genai_config", str), ("verification.prompt_ids", IDS),
                  ("verification.greedy_tokens", IDS)),
}
OPTIONAL_FIELDS: tuple[Field, ...] = (  # checked when present
    ("model.context_file", str), ("model.ops_config", str), ("model.batch_size", COUNT),
    ("verification.device_min_cosine", NUMBER), ("verification.device_max_rel_diff", NUMBER),
    ("verification.logit_margins", list), ("profile.file", str), ("profile.values.package", dict),
    ("profile.values.llm", dict), ("profile.values.accuracy", dict), ("source.gguf_file", str),
    ("source.name", str), ("source.path", str))  # name: newer manifests; path: older
# inspect and report: what they show beside the files
DISPLAY_FIELDS: dict[str, tuple[Field, ...]] = {
    "encoder": (("source.architecture", str), ("precision", dict), ("precision.summary", dict),
                ("precision.nodes", list), ("size", dict), ("size.model_bytes", NUMBER), ("accuracy", dict),
                ("accuracy.samples", COUNT), ("accuracy.mean_cosine", NUMBER), ("accuracy.min_cosine", NUMBER),
                ("accuracy.retrieval_top1", NUMBER), ("profile.values.accuracy.eval_seq_len", COUNT)),
    "causal-lm": (("source.architecture", str), ("precision", dict),
                  ("precision.summary", dict), ("precision.nodes", list), ("size", dict),
                  ("size.model_bytes", NUMBER), ("accuracy", dict), ("accuracy.tokens", COUNT),
                  ("accuracy.perplexity", NUMBER), ("accuracy.ref_perplexity", NUMBER),
                  ("accuracy.ppl_increase", NUMBER), ("accuracy.mean_kl", NUMBER),
                  ("accuracy.top1_agreement", NUMBER), ("profile.values.llm.window_tokens", COUNT),
                  ("profile.values.llm.eval_windows", COUNT)),
}
KINDS = tuple(KIND_FIELDS)


def _is(value: object, kind: object) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == NUMBER:
        return number and math.isfinite(value)
    if kind == COUNT:
        return number and isinstance(value, int) and value >= 1
    if kind == IDS:
        return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if kind is int:
        return number and isinstance(value, int)
    return isinstance(value, kind)


_MISSING = object()


def _lookup(manifest: dict, key: str) -> object:
    value: object = manifest
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def check_fields(manifest: dict, fields: tuple[Field, ...], where: Path, optional: bool = False) -> None:
    """PackageError naming the first of ``fields`` that is missing (unless ``optional``) or of the wrong type."""
    for key, kind in fields:
        value = _lookup(manifest, key)
        if value is _MISSING and optional:
            continue
        if value is _MISSING or not _is(value, kind):
            name = kind if isinstance(kind, str) else {dict: "an object", list: "a list", str: "a string"}.get(kind, kind.__name__)
            got = "missing" if value is _MISSING else f"{type(value).__name__} {_short(value)}"
            raise PackageError(f"{where} is malformed: '{key}' must be {name}, got {got}", REEXPORT)


def _short(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_structure(manifest: dict, where: Path) -> None:
    check_fields(manifest, CORE_FIELDS, where)
    kind = manifest["source"]["kind"]
    if kind not in KINDS:
        raise PackageError(f"{where} is malformed: source.kind {kind!r} is not one of {', '.join(KINDS)}", REEXPORT)
    check_fields(manifest, KIND_FIELDS[kind], where)
    check_fields(manifest, OPTIONAL_FIELDS, where, optional=True)
    gguf = manifest["source"].get("gguf_file")
    if gguf and len(plain_relative_path(gguf, "the manifest's source.gguf_file").parts) != 1:
        raise PackageError(f"{where} is malformed: source.gguf_file {gguf!r} is not a file name", REEXPORT)
    for name, entry in manifest["files"].items():
        plain_relative_path(name, "the manifest's file")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _is(entry.get("size"), int)):
            raise PackageError(f"{where} is malformed: files[{name!r}] must hold a sha256 string and an integer size",
                               REEXPORT)
    for key in ("file", "context_file", "ops_config", "genai_config"):
        if key in manifest["model"]:
            plain_relative_path(manifest["model"][key], f"the manifest's model.{key}")


def read_package_json(path: Path) -> object:
    """A JSON file of a package (a stranger's): PackageError if it does not parse, however deeply nested."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise PackageError(f"{path} is not valid JSON: {exc}", REEXPORT) from exc


def read_manifest(folder: Path) -> dict:
    """The manifest of the package ``folder``, checked: the folder holds no symlink or special file, the JSON has
    the fields every command reads (CORE_FIELDS, KIND_FIELDS) with their types, and every path it names is plain.
    PackageError (exit 2) otherwise. Whether the files and outputs match is verify's business, not this."""
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
    manifest = read_package_json(path)
    if not isinstance(manifest, dict):
        raise PackageError(f"{path} does not hold a JSON object", REEXPORT)
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise PackageError(f"{path}: schema_version {manifest.get('schema_version')!r}, this edgeq reads {SCHEMA_VERSION}",
                           "use the edgeq version that wrote the package, or re-export it")
    _check_structure(manifest, path)
    return manifest
