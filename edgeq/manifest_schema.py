"""The manifest's schema (version 2) as frozen dataclasses: what every command reads from a package, typed.

``Manifest.from_dict(d, where)`` checks a manifest's JSON against the annotations of these classes and returns the
typed record; every missing or wrongly typed field is a PackageError naming its dotted key (a package comes from
anyone). ``to_dict()`` gives the JSON back. Keys the schema does not name are kept in each record's ``extra``, so a
round trip (read, write) loses nothing.

``recipe`` says how the package was made and is what readers branch on ("encoder-cpu", "encoder-qnn",
"causal-lm"); ``Manifest.accuracy`` and ``Manifest.verification`` are the encoder or the LM record to match.
Annotation conventions: ``float`` is a finite number (an int is taken as it is), ``int`` excludes bool, ``Count``
is an int >= 1, ``Any`` is any JSON, ``X | None`` may be missing, lists are read into tuples.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Annotated, Any, ClassVar, Union

from edgeq.errors import PackageError
from edgeq.precision import CAUSAL_LM, ENCODER_CPU, ENCODER_QNN  # the recipe names, one definition

SCHEMA_VERSION = 2
_MISSING = object()
REEXPORT = "re-export the package with 'edgeq export' (or get it again from whoever made it)"
RECIPES = {ENCODER_CPU: "encoder", ENCODER_QNN: "encoder", CAUSAL_LM: "causal-lm"}  # recipe -> source.kind
KINDS = ("encoder", "causal-lm")
_POSITIVE = "a positive integer"
Count = Annotated[int, _POSITIVE]
ALWAYS = {"always": True}  # field metadata: written as null when None (the writer always writes the key)


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


def malformed(where: object, key: str, need: str, value: object = _MISSING) -> PackageError:
    """The error for the field ``key`` that is not ``need`` (``value``: what it holds; unset, missing)."""
    got = "missing" if value is _MISSING else f"{type(value).__name__} {_short(value)}"
    return PackageError(f"{where} is malformed: '{key}' must be {need}, got {got}", REEXPORT)


def _short(value: object) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------------------------------- the reader
def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse(value: object, tp: object, key: str, where: object) -> object:
    """``value`` checked against the annotation ``tp``; ``key`` (dotted) names it in the error."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = next(a for a in args if a is not type(None))
        return None if value is None else _parse(value, inner, key, where)
    if origin is Annotated:  # Count
        if not (_is_number(value) and isinstance(value, int) and value >= 1):
            raise malformed(where, key, args[1], value)
        return value
    if isinstance(tp, type) and issubclass(tp, Record):
        return tp.from_dict(value, where, key)
    if origin is tuple:
        if not isinstance(value, list):
            raise malformed(where, key, "a list", value)
        return tuple(_parse(v, args[0], f"{key}[{i}]", where) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise malformed(where, key, "an object", value)
        return {k: _parse(v, args[1], f"{key}[{k!r}]", where) for k, v in value.items()}
    if tp is Any:
        if value is _MISSING:
            raise malformed(where, key, "present", value)
        return value
    ok = {str: isinstance(value, str), bool: isinstance(value, bool),
          int: _is_number(value) and isinstance(value, int),
          float: _is_number(value) and math.isfinite(value)}[tp]
    if not ok:
        raise malformed(where, key, {str: "a string", bool: "true or false", int: "an integer",
                                     float: "a finite number"}[tp], value)
    return value


@functools.cache
def _hints(cls: type) -> dict[str, object]:
    return typing.get_type_hints(cls, include_extras=True)


def _dump(value: object) -> object:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_dump(v) for v in value]
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    return value


@dataclass(frozen=True, kw_only=True)
class Record:
    """A section of the manifest: its annotated fields, typed, plus ``extra``, the keys the schema does not name."""

    extra: Mapping[str, Any] = field(default_factory=dict, repr=False)
    PATHS: ClassVar[tuple[str, ...]] = ()  # fields naming a file in the package: plain relative paths

    @classmethod
    def from_dict(cls, d: object, where: object, key: str = ""):
        """The record of the JSON object ``d`` found at ``key`` (dotted) of the manifest ``where``."""
        if not isinstance(d, dict):
            raise malformed(where, key, "an object", d)
        return cls._read(d, where, key, {})

    @classmethod
    def _read(cls, d: dict, where: object, key: str, types: dict[str, object]):
        """Every field typed (``types`` overrides a field's annotation), the rest kept as ``extra``; then check()."""
        hints = {**_hints(cls), **types}
        values = {}
        for f in dataclasses.fields(cls):
            if f.name == "extra":
                continue
            dotted = f"{key}.{f.name}" if key else f.name
            optional = f.default is None
            values[f.name] = None if optional and f.name not in d else _parse(d.get(f.name, _MISSING), hints[f.name],
                                                                               dotted, where)
        for name in cls.PATHS:
            if values[name] is not None:
                plain_relative_path(values[name], f"the manifest's {key}.{name}" if key else f"the manifest's {name}")
        record = cls(**values, extra={k: v for k, v in d.items() if k not in values})
        record.check(where, key)
        return record

    def check(self, where: object, key: str) -> None:
        """Rules across fields (a subclass's); the field types are checked already."""

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "extra" and (value is not None or f.metadata.get("always")):
                out[f.name] = _dump(value)
        return {**out, **self.extra}


# ---------------------------------------------------------------------------------------------------- sections
@dataclass(frozen=True, kw_only=True)
class SourceRecord(Record):
    """What the package was made from: by folder name and file hashes (``path``: older packages' local folder)."""

    kind: str
    architecture: str
    name: str | None = None
    path: str | None = None
    model_type: str | None = None
    task: str | None = None
    pooling: str | None = None
    gguf_file: str | None = None
    allow_pickle: bool | None = None
    weight_format: str | None = None
    weight_files: tuple[str, ...] | None = None
    files: dict[str, str] | None = None

    def check(self, where: object, key: str) -> None:
        if self.kind not in KINDS:
            raise PackageError(f"{where} is malformed: source.kind {self.kind!r} is not one of {', '.join(KINDS)}",
                               REEXPORT)
        if self.gguf_file and len(plain_relative_path(self.gguf_file, "the manifest's source.gguf_file").parts) != 1:
            raise PackageError(f"{where} is malformed: source.gguf_file {self.gguf_file!r} is not a file name",
                               REEXPORT)


@dataclass(frozen=True, kw_only=True)
class EncoderEvalValues(Record):  # profile.values.accuracy: what inspect, report and speed read
    eval_seq_len: Count


@dataclass(frozen=True, kw_only=True)
class LLMValues(Record):  # profile.values.llm
    window_tokens: Count
    eval_windows: Count


@dataclass(frozen=True, kw_only=True)
class ProfileValues(Record):
    """The profile as applied (--set included): Profile.to_dict(); typed where a command reads it."""

    accuracy: EncoderEvalValues | None = None
    llm: LLMValues | None = None
    package: dict[str, Any] | None = None

    def recorded(self, section: str, key: str) -> object:
        """The value ``section.key`` of the profile as applied, None when not recorded. Untyped on purpose: verify
        lets a recorded bar tighten its profile's only where it is a finite number (any other value, nothing)."""
        values = self.to_dict().get(section)
        return values.get(key) if isinstance(values, dict) else None


@dataclass(frozen=True, kw_only=True)
class ProfileRecord(Record):
    name: str
    values: ProfileValues
    file: str | None = None
    sha256: str | None = None
    overrides: dict[str, Any] | None = None  # ExportRequest's own fields and the --set keys


@dataclass(frozen=True, kw_only=True)
class ModelRecord(Record):
    file: str
    format: str | None = None
    execution_provider: str | None = None
    runtime: str | None = None
    genai_config: str | None = None  # causal-lm: onnxruntime-genai's config
    ops_config: str | None = None
    target_platform: str | None = None
    context_file: str | None = None  # encoder-qnn: the EPContext model
    batch_size: Count | None = None  # static-shape models
    seq_len: Count | None = None
    inputs: tuple[Any, ...] | None = None
    outputs: tuple[Any, ...] | None = None
    ort_version: str | None = None
    fusions: str | None = None
    PATHS: ClassVar[tuple[str, ...]] = ("file", "context_file", "ops_config", "genai_config")

    def check(self, where: object, key: str) -> None:
        # a static-shape model is run batch by batch at exactly its shape: one without the other cannot be run
        if (self.batch_size is None) != (self.seq_len is None):
            missing = "seq_len" if self.seq_len is None else "batch_size"
            raise malformed(where, f"{key}.{missing}", "a positive integer (a static shape records batch_size and seq_len)")


@dataclass(frozen=True, kw_only=True)
class FileEntry(Record):
    sha256: str
    size: int


@dataclass(frozen=True, kw_only=True)
class SizeRecord(Record):
    """Encoders: against the FP32 export (``ratio``, ``max_ratio``); causal LMs: against ``max_mb``."""

    model_bytes: float
    fp32_onnx_bytes: float | None = None
    ratio: float | None = None
    max_ratio: float | None = None
    checked: bool | None = None
    max_mb: float | None = None  # causal LMs: 0 = no absolute cap
    bits_per_weight: float | None = None  # causal LMs: the quantized linear layers' average, stored bits
    max_bits_per_weight: float | None = None

    def check(self, where: object, key: str) -> None:
        if self.ratio is None and self.max_mb is None:
            raise malformed(where, f"{key}.max_mb", "a finite number (or size.ratio)")
        if self.ratio is not None:
            for name in ("fp32_onnx_bytes", "max_ratio"):
                if getattr(self, name) is None:
                    raise malformed(where, f"{key}.{name}", "a finite number")


@dataclass(frozen=True, kw_only=True)
class CalibrationRecord(Record):
    file: str | None = None
    sha256: str | None = None
    method: str | None = None
    samples: int | None = None  # encoders: texts
    seq_len: int | None = None
    sensitivity_samples: int | None = None
    smoothing: dict[str, float] | None = None  # encoders: smoothed input -> its alpha (edgeq/stages/smooth.py)
    per_token: dict[str, str] | None = None  # encoders: per-token input -> its zero point (edgeq/passes/per_token.py)
    windows: int | None = None  # causal LMs: token windows
    window_tokens: int | None = None


@dataclass(frozen=True, kw_only=True)
class NodeRecord(Record):
    """One node's precision and the reason for it."""

    name: str
    precision: str
    reason: str
    op: str | None = None
    category: str | None = None
    role: str | None = None
    sensitivity: float | None = None  # encoder-cpu: cosine when kept at higher precision
    weight_sqnr_db: float | None = None  # encoder-qnn


@dataclass(frozen=True, kw_only=True)
class PrecisionRecord(Record):
    summary: dict[str, dict[str, int]]  # op category -> precision -> nodes
    nodes: tuple[NodeRecord, ...]
    promoted_sensitive_layers: int | None = None
    selection_accuracy_on_calibration_text: dict[str, Any] | None = None
    int4: dict[str, Any] | None = None  # causal LMs: the INT4 setting and layer counts


@dataclass(frozen=True, kw_only=True)
class EncoderAccuracyRecord(Record):
    """Pooled outputs vs the FP32 export on held-back texts."""

    samples: Count
    mean_cosine: float
    min_cosine: float
    retrieval_top1: float
    reference: str | None = None
    runtime: str | None = None
    evaluation_file: str | None = None
    evaluation_sha256: str | None = None
    budget: dict[str, float] | None = None

    def numbers(self) -> dict[str, float]:
        return _numbers(self)


@dataclass(frozen=True, kw_only=True)
class LMAccuracyRecord(Record):
    """Next-token predictions vs the FP32 export on held-back token windows."""

    tokens: Count
    perplexity: float
    ref_perplexity: float
    ppl_increase: float  # a fraction: 0.06 = +6%
    mean_kl: float
    top1_agreement: float
    ppl_increase_interval: tuple[float, ...] | None = field(default=None, metadata=ALWAYS)
    windows: int | None = None
    reference: str | None = None
    evaluation_file: str | None = None
    evaluation_sha256: str | None = None
    budget: dict[str, float] | None = None

    def check(self, where: object, key: str) -> None:
        if self.ppl_increase_interval is not None and len(self.ppl_increase_interval) != 2:
            raise malformed(where, f"{key}.ppl_increase_interval", "two numbers (low, high)",
                            list(self.ppl_increase_interval))

    def numbers(self) -> dict[str, float]:
        return _numbers(self)


def _numbers(record: Record) -> dict[str, float]:
    """The record's top-level numbers (what a report row compares), the extra ones too."""
    return {k: v for k, v in record.to_dict().items() if _is_number(v)}


@dataclass(frozen=True, kw_only=True)
class EncoderVerification(Record):
    """Stored sample inputs and the pooled outputs the package must reproduce, with its bars."""

    inputs: dict[str, Any]
    pooling: str
    reference_pooled: tuple[Any, ...]  # rows of numbers; verify compares shapes itself (an edit fails, not crashes)
    min_cosine: float
    max_rel_diff: float
    device_min_cosine: float | None = None
    device_max_rel_diff: float | None = None
    fp32_pooled: tuple[Any, ...] | None = None
    texts: tuple[str, ...] | None = None

    def check(self, where: object, key: str) -> None:
        mask = self.inputs.get("attention_mask", _MISSING)
        if not isinstance(mask, list):
            raise malformed(where, f"{key}.inputs.attention_mask", "a list", mask)


@dataclass(frozen=True, kw_only=True)
class LMVerification(Record):
    """A chat prompt and the greedy tokens the package must generate for it."""

    prompt_ids: tuple[int, ...]
    greedy_tokens: tuple[int, ...]
    prompt: str | None = None
    logit_margins: tuple[float, ...] | None = None
    greedy_runtime: str | None = None  # what generated them at export (edgeq.llm.greedy.package_greedy)


@dataclass(frozen=True, kw_only=True)
class Placement(Record):
    nodes: dict[str, int]  # execution provider -> nodes
    partitions: dict[str, int]
    htp_fraction: float | None = None


@dataclass(frozen=True, kw_only=True)
class SimulatorRun(Record):
    placement: Placement
    accuracy_vs_fp32: EncoderAccuracyRecord


@dataclass(frozen=True, kw_only=True)
class QnnSimulator(Record):
    cpu_ep_fallback: str
    runs: dict[str, SimulatorRun]  # model file -> its run on the HTP simulator
    texts: int | None = None


@dataclass(frozen=True, kw_only=True)
class QnnContext(Record):
    file: str
    embed_mode: int | None = None
    placement_when_compiled: Placement | None = None
    PATHS: ClassVar[tuple[str, ...]] = ("file",)


@dataclass(frozen=True, kw_only=True)
class QnnRecord(Record):
    """encoder-qnn: the SoC compiled for, and where the nodes ran on the HTP simulator."""

    soc_model: int
    htp_arch: int
    context: QnnContext
    simulator: QnnSimulator
    backend: str | None = None
    graph_passes: tuple[Any, ...] | None = None
    qnn_preprocess_fused: bool | None = None

    def check(self, where: object, key: str) -> None:
        if self.context.file not in self.simulator.runs:
            raise malformed(where, f"{key}.simulator.runs[{self.context.file!r}]", "an object")


@dataclass(frozen=True, kw_only=True)
class TokenizerRecord(Record):
    rewritten: bool
    changes: tuple[str, ...] | None = None
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None


@dataclass(frozen=True, kw_only=True)
class PartitionCounts(Record):
    nodes: int
    supported_nodes: int
    partitions: int


@dataclass(frozen=True, kw_only=True)
class PartitionCheck(Record):
    verdict: str
    as_is: PartitionCounts
    fixed_shapes: PartitionCounts


@dataclass(frozen=True, kw_only=True)
class Partitions(Record):
    """ONNX Runtime's partitioning check per execution provider (JSON: the EPs' names beside ``tool``)."""

    tool: str | None = None
    checks: dict[str, PartitionCheck] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: object, where: object, key: str = "partitions"):
        if not isinstance(d, dict):
            raise malformed(where, key, "an object", d)
        tool = _parse(d.get("tool"), str | None, f"{key}.tool", where)
        checks = {ep: PartitionCheck.from_dict(v, where, f"{key}.{ep}") for ep, v in d.items() if ep != "tool"}
        return cls(tool=tool, checks=checks)

    def to_dict(self) -> dict:
        return {**({"tool": self.tool} if self.tool is not None else {}),
                **{ep: c.to_dict() for ep, c in self.checks.items()}}


# ---------------------------------------------------------------------------------------------------- the manifest
@dataclass(frozen=True, kw_only=True)
class Manifest(Record):
    """A package's manifest.json, schema version 2. ``recipe`` is the discriminator readers branch on."""

    schema_version: int
    recipe: str
    source: SourceRecord
    profile: ProfileRecord
    tools: dict[str, str] | None = None
    model: ModelRecord
    qnn: QnnRecord | None = None
    tokenizer: TokenizerRecord | None = None
    size: SizeRecord
    calibration: CalibrationRecord | None = None
    precision: PrecisionRecord
    accuracy: EncoderAccuracyRecord | LMAccuracyRecord
    partitions: Partitions | None = None
    verification: EncoderVerification | LMVerification
    files: dict[str, FileEntry]

    @classmethod
    def from_dict(cls, d: object, where: object, key: str = "") -> Manifest:
        """The typed manifest of the v2 JSON ``d``; ``where`` (the file) names it in every PackageError."""
        if not isinstance(d, dict):
            raise PackageError(f"{where} does not hold a JSON object", REEXPORT)
        source = SourceRecord.from_dict(d.get("source", _MISSING), where, "source")
        recipe = d.get("recipe", _MISSING)
        if not isinstance(recipe, str) or recipe not in RECIPES:
            raise malformed(where, "recipe", f"one of {', '.join(RECIPES)}", recipe)
        if source.kind != RECIPES[recipe]:  # before the recipe's records are read: they would name a wrong field
            raise PackageError(f"{where} is malformed: recipe {recipe!r} is for source.kind {RECIPES[recipe]!r}, not "
                               f"{source.kind!r}", REEXPORT)
        llm = recipe == CAUSAL_LM
        # the two variant sections are read as the recipe's record: the annotation's union is for readers
        manifest = cls._read(d, where, key, {"accuracy": LMAccuracyRecord if llm else EncoderAccuracyRecord,
                                             "verification": LMVerification if llm else EncoderVerification})
        for name in manifest.files:
            plain_relative_path(name, "the manifest's file")
        return manifest

    def check(self, where: object, key: str) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise malformed(where, "schema_version", str(SCHEMA_VERSION), self.schema_version)
        needed = ({"model.genai_config": self.model.genai_config, "profile.values.llm": self.profile.values.llm}
                  if self.is_llm else {"profile.values.accuracy": self.profile.values.accuracy})
        for name, value in needed.items():
            if value is None:
                raise malformed(where, name, "a string" if name.startswith("model.") else "an object")

    @property
    def is_llm(self) -> bool:
        return self.recipe == CAUSAL_LM

    @property
    def is_qnn(self) -> bool:
        return self.recipe == ENCODER_QNN

    @property
    def source_name(self) -> str:
        """The source's folder name (older packages recorded its path)."""
        return self.source.name or PurePosixPath(self.source.path or "?").name

    def model_bytes(self) -> int:
        """Bytes of the package's model files (model.*: the model, its external data, an EPContext model)."""
        return sum(e.size for n, e in self.files.items() if n.startswith("model."))
