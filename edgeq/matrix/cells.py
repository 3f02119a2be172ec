"""The cells of a matrix: one ``edgeq export`` (+ verify, + device check) each, named by a hash of its inputs.

A cell's identity is the sha256 of what its package is made from, as the manifest records it: the manifest's own
provenance (source name and file hashes, the profile's file hash and every value after the overrides, the overrides
in their order), the calibration and evaluation files' hashes, the package name and the tool versions the manifest
records. Two cells with one key give the same bytes (packages are byte-reproducible); any input that changes the
bytes changes the key. The hash is computed by the driver, and again by the worker that builds the cell, from its own
view of the inputs: a node with another onnxruntime, or other model bytes at the same path, fails the cell instead of
storing a package under a key it does not match.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgeq.errors import MatrixFileError, UserInputError
from edgeq.families import DECODER, OPTIMUM, by_gguf_arch, by_model_type
from edgeq.manifest import tool_versions
from edgeq.matrix.spec import MatrixSpec, ModelEntry, Settings
from edgeq.modelsource import ModelSource, inspect_model_dir
from edgeq.pipeline import ExportRequest, Inputs, check_inputs
from edgeq.profiles import QNN_EP, load_profile
from edgeq.staging import parameter_count
from edgeq.stages.record import provenance, text_file_record
from edgeq.targets import DEVICE_BY_EP

IDENTITY_FORMAT = 1  # bump when what the key hashes changes: every cell is then built again

# Peak RSS of one export process as (fixed MB, bytes per parameter), by the family's exporter. The fixed part is
# Python with torch, ONNX Runtime, the tokenizer and the text; the rest scales with the weights. Measured:
# encoders (optimum's exporter holds the torch model, the FP32 ONNX export and sessions over it): all-MiniLM-L6-v2,
# 22.7 M parameters, 1960 MB (BENCHMARKS.md) -> 1500 + 20 x 22.7 = 1954. Causal LMs (edgeq.decoder streams the
# weights a tensor at a time): SmolLM2-135M 1450 MB (README), a Llama-3.2-1B-shaped checkpoint, 1.24 B parameters,
# 4130 MB (bench/results/scale.json) -> 1200 + 2.6 x 135 = 1551 and 1200 + 2.6 x 1236 = 4414, both above.
PEAK_MEMORY = {OPTIMUM: (1500, 20.0), DECODER: (1200, 2.6)}
# The Ray resource a cell needs beside memory: the HTP simulator (every QNN export compiles and runs on it), and the
# device a device check runs on (arm64: qemu-user-static with PyPI's aarch64 ONNX Runtime).
QNN_SIMULATOR = "qnn_sim"
DEVICE_RESOURCES = {"arm64": "qemu_arm64", "qnn-htp": QNN_SIMULATOR}


@dataclass(frozen=True)
class Cell:
    key: str  # sha256 of ``inputs`` as canonical JSON
    name: str  # the package's name: <model>-<profile>
    model: str
    profile: str  # the profile's name
    request: ExportRequest  # out_dir is the store's: the executor writes into the cell's own folder
    device: str | None  # the edgeq.targets name the package is also checked on, or None
    memory_mb: int  # declared peak memory: the local pool admits by it, Ray reserves it
    resources: tuple[tuple[str, float], ...] = ()  # Ray custom resources the cell needs
    inputs: dict = field(default_factory=dict, compare=False)  # what the key hashes

    def to_dict(self) -> dict:
        r = self.request
        return {"key": self.key, "name": self.name, "model": self.model, "profile": self.profile,
                "request": {"model_dir": str(r.model_dir), "profile": r.profile, "gguf_file": r.gguf_file,
                            "allow_pickle": r.allow_pickle, "calibration": None if r.calibration is None
                            else str(r.calibration), "settings": [list(s) for s in r.settings], "name": r.name},
                "device": self.device, "memory_mb": self.memory_mb, "resources": dict(self.resources),
                "inputs": self.inputs}


@dataclass(frozen=True)
class Skipped:
    model: str
    profile: str
    reason: str


def request_from(cell: dict, out_dir: Path) -> ExportRequest:
    """The export request of a cell as ``Cell.to_dict`` wrote it (a worker reads it from the store)."""
    r = cell["request"]
    return ExportRequest(Path(r["model_dir"]), r["profile"], out_dir,
                         None if r["calibration"] is None else Path(r["calibration"]), force=True,
                         gguf_file=r["gguf_file"], allow_pickle=r["allow_pickle"],
                         settings=tuple((k, v) for k, v in r["settings"]), name=r["name"])


def identity(inputs: Inputs, req: ExportRequest) -> dict:
    """What a cell's key hashes, as plain JSON data (module doc)."""
    return json.loads(json.dumps({
        "format": IDENTITY_FORMAT, **provenance(inputs, req),
        "calibration": text_file_record(inputs.calibration), "evaluation": text_file_record(inputs.evaluation),
        "package": inputs.dest.name, "tools": tool_versions()}))


def cell_key(inputs: dict) -> str:
    """Key order kept, not sorted: the overrides' order is in the manifest's bytes, so it is in the key."""
    text = json.dumps(inputs, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def differences(a: object, b: object, where: str = "") -> list[str]:
    """The paths at which two JSON values differ ('tools.onnxruntime: 1.31.0 != 1.32.0'), for a worker's refusal."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in dict.fromkeys([*a, *b]) for d in differences(a.get(k), b.get(k), f"{where}.{k}".strip("."))]
    return [] if a == b else [f"{where or 'inputs'}: {json.dumps(a)[:80]} != {json.dumps(b)[:80]}"]


def estimate_mb(exporter: str, parameters: int) -> int:
    fixed, per_parameter = PEAK_MEMORY[exporter]
    return int(fixed + per_parameter * parameters / 1e6)


def peak_memory_mb(source: ModelSource) -> int:
    """The declared peak memory of an export of ``source`` (PEAK_MEMORY, by its family's exporter)."""
    family = by_model_type(source.model_type) or by_gguf_arch(source.model_type)
    return estimate_mb(family.exporter if family else OPTIMUM, parameter_count(source)[0])


def _settings(spec: MatrixSpec, model: ModelEntry, model_name: str, profile: str) -> tuple[Settings, bool]:
    """The cell's overrides (the file's, then the model's, then each matching [[cell]]'s; a later value wins, a
    key keeps its first place) and whether it gets a device check."""
    merged = dict(spec.settings)
    merged.update(model.settings)
    device = spec.device_check
    for o in spec.overrides:
        if o.model in (None, model_name) and o.profile in (None, profile):
            merged.update(o.settings)
            device = device if o.device_check is None else o.device_check
    return tuple(merged.items()), device


def _context(spec: MatrixSpec, what: str, exc: UserInputError) -> MatrixFileError:
    return MatrixFileError(f"matrix file {spec.path}, {what}: {exc.message}", exc.hint)


def model_sources(spec: MatrixSpec) -> list[tuple[ModelEntry, ModelSource, str]]:
    """(entry, checked source, name) per model: each folder checked and hashed once, names unique."""
    out, seen = [], {}
    for i, m in enumerate(spec.models):
        try:
            source = inspect_model_dir(m.model_dir, m.gguf_file, m.allow_pickle)
        except UserInputError as exc:
            raise _context(spec, f"[[model]] {i + 1}", exc) from None
        name = m.name or source.name
        if name in seen:
            raise MatrixFileError(f"matrix file {spec.path}: models {seen[name] + 1} and {i + 1} are both named "
                                  f"'{name}'", "give one of them a name = \"...\" (it names the packages)")
        seen[name] = i
        out.append((m, source, name))
    return out


def _check_overrides(spec: MatrixSpec, models: list[str], profiles: dict[str, str]) -> None:
    for i, o in enumerate(spec.overrides):
        for what, value, known in (("model", o.model, models), ("profile", o.profile, list(profiles))):
            if value is not None and value not in known:
                raise MatrixFileError(f"matrix file {spec.path}: [[cell]] {i + 1} names the {what} '{value}', "
                                      "which is not in the matrix", f"{what}s in the matrix: {', '.join(known)}")


def plan_cells(spec: MatrixSpec, store_dir: Path) -> tuple[list[Cell], list[Skipped]]:
    """Every model x profile of ``spec`` as a checked Cell (the pipeline's own input checks, so a user mistake in
    any cell stops the matrix before any work), or Skipped where the profile does not take the model's kind."""
    sources = model_sources(spec)
    try:
        profiles = {p: load_profile(p) for p in spec.profiles}  # the file alone: its name and the kinds it takes
    except UserInputError as exc:
        raise _context(spec, "profiles", exc) from None
    _check_overrides(spec, [name for _, _, name in sources], profiles)
    cells, skipped = [], []
    for model, source, name in sources:
        for profile_ref, bare in profiles.items():
            if source.kind not in bare.model_kinds:
                skipped.append(Skipped(name, bare.name, f"profile '{bare.name}' takes {', '.join(bare.model_kinds)} "
                                                        f"models, not {source.kind}"))
                continue
            settings, device_check = _settings(spec, model, name, profile_ref)
            req = ExportRequest(model.model_dir, profile_ref, store_dir, spec.calibration, force=True,
                                gguf_file=model.gguf_file, allow_pickle=model.allow_pickle, settings=settings,
                                name=f"{name}-{bare.name}" if model.name else None)
            try:
                inputs = check_inputs(req, source)
            except UserInputError as exc:
                raise _context(spec, f"cell {name} x {bare.name}", exc) from None
            preimage = identity(inputs, req)
            device = DEVICE_BY_EP[inputs.profile.execution_provider] if device_check else None
            resources = {QNN_SIMULATOR: 1.0} if inputs.profile.execution_provider == QNN_EP else {}
            if device:
                resources[DEVICE_RESOURCES[device]] = 1.0
            cells.append(Cell(cell_key(preimage), inputs.dest.name, name, bare.name, replace(req, out_dir=store_dir),
                              device, model.memory_mb or peak_memory_mb(source), tuple(sorted(resources.items())),
                              preimage))
    return cells, skipped
