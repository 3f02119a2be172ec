"""Device profiles: declarative TOML files in ``export_profiles/`` parsed into frozen, validated objects.

Every field carries a ``doc`` (shown by ``edgeq profiles --fields``) and, where the set of values is closed, its
``choices``. A key that is not a field is refused; when it is close to one (difflib ratio >= 0.8, as pypa/build's
``_find_typo``) the error suggests it.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from edgeq.errors import ProfileError
from edgeq.precision import CAUSAL_LM, ENCODER_CPU, LM_HEAD, allowed
from edgeq.resources import PROFILES_DIR

# the execution providers a profile builds for: the one name each, for every place that branches on them
CPU_EP, QNN_EP = "CPUExecutionProvider", "QNNExecutionProvider"
INT4_METHODS = ("gptq", "rtn")  # llm.int4_method, --int4-method and edgeq.decoder.layerwise take these


def _f(doc: str, default=dataclasses.MISSING, choices: tuple = (), minimum=None, maximum=None,
       precision_of: tuple[str, str] | None = None, **kw):
    """A dataclass field with its documentation and, optionally, its allowed values or range (inclusive).
    ``precision_of`` = (kind, category): a precision field; its choices (all that a pass implements there, unless
    narrowed) are checked against edgeq.precision's table."""
    if precision_of:
        implemented = tuple(str(p) for p in allowed(*precision_of))
        assert set(choices) <= set(implemented), (choices, precision_of)
        choices = choices or implemented
    meta = {"doc": doc, "choices": choices, "minimum": minimum, "maximum": maximum, "precision_of": precision_of}
    if default is dataclasses.MISSING:
        return field(metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass(frozen=True)
class QuantizationSpec:
    """How weights and activations are quantized and how the sensitive layers are chosen."""

    weight_type: str = _f("Storage type of quantized linear-layer weights.", "int8", ("int8",))
    weight_symmetric: bool = _f(
        "Symmetric weights (zero point 0, range [-127, 127]); what ARM int8 kernels expect.", True
    )
    weight_per_channel: bool = _f("One scale per output channel instead of one per tensor.", True)
    activation_type: str = _f(
        "Storage type of statically quantized activations (asymmetric, zero point from calibration).",
        "uint8",
        ("uint8", "int8", "uint16", "int16"),
    )
    calibration_method: str = _f(
        "How an activation's range is set from calibration data: 'minmax' (observed extremes) or "
        "'percentile' (each tail clipped at calibration_percentile, ignoring rare outliers).",
        "percentile",
        ("minmax", "percentile"),
    )
    calibration_percentile: float = _f("Percentile used by calibration_method = 'percentile'.", 99.999,
                                       minimum=90.0, maximum=100.0)
    calibration_samples: int = _f("Calibration texts used (from the calibration split, in order).", 128, minimum=1)
    calibration_seq_len: int = _f("Maximum tokens per calibration text (longer ones are truncated).", 128, minimum=8)
    smoothing: bool = _f(
        "Per-channel smoothing of statically quantized activations (SmoothQuant): an input's channel k is divided "
        "by t_k and row k of its layers' weights multiplied by it, t chosen per input from calibration tokens where it "
        "lowers the layers' output error (edgeq/stages/smooth.py). Costs one Mul per smoothed input at run time.",
        False,
    )
    sensitive_precision: str = _f(
        "Precision given to the linear layers that the sensitivity measurement marks as too sensitive for "
        "the default int8: 'int8-per-token' quantizes their activations at run time with a range per token (an "
        "integer GEMM; outlier tokens no longer set everyone's range), 'int8-weight-only' keeps int8 weights with "
        "float activations (8-bit MatMulNBits: see matmulnbits_accuracy_level), 'w8a16' quantizes activations to "
        "16 bits, 'fp32' leaves the layer as exported.",
        "int8-weight-only",
        precision_of=(ENCODER_CPU, "linear"),
    )
    sensitivity_target_mean_cosine: float = _f(
        "Layers are promoted to sensitive_precision, most sensitive first, until the mean cosine against "
        "FP32 on the calibration split reaches this and the two targets below are met too. Each is set above its "
        "accuracy-budget bar, which the held-back split is gated on (the margin is for unseen text); the search "
        "never aims below the bar. A failed gate's hint names the target that passes, measured.",
        0.998,
        minimum=0.0,
        maximum=1.0,
    )
    sensitivity_target_min_cosine: float = _f(
        "Promotion goes on until the worst calibration text's cosine against FP32 reaches this too (at least "
        "accuracy.min_min_cosine: the worst of the 320 held-back texts is usually below the worst of fewer "
        "calibration texts; MiniLM's chosen plan: 0.99689 on calibration, 0.99357 held back).",
        0.99,
        minimum=0.0,
        maximum=1.0,
    )
    sensitivity_target_retrieval_top1: float = _f(
        "Promotion goes on until the retrieval top-1 agreement with FP32 among the calibration texts reaches this "
        "too (at least accuracy.min_retrieval_top1; one text of 128 moves it by 0.0078, and it is not monotone in "
        "the promotions: docs/decisions/encoder-quantization.md).",
        0.96,
        minimum=0.0,
        maximum=1.0,
    )
    sensitivity_samples: int = _f(
        "Calibration texts (the first ones) whose tokens are sampled, up to ~512 per layer input, to measure each "
        "linear layer's output error per precision (the promotion ranking) and to choose smoothing.", 64, minimum=1)
    keep_fp16: tuple[str, ...] = _f(
        "Op categories stored and computed in FP16 rather than quantized (see edgeq/categories.py).",
        ("embedding", "norm"),
        ("embedding", "norm"),
    )
    keep_fp32_nodes: tuple[str, ...] = _f(
        "Node-name glob patterns never quantized (profile override, applied after the hard rules).", ()
    )


@dataclass(frozen=True)
class PackageSpec:
    """What the emitted package holds."""

    format: str = _f("Model file format: 'ort' (ONNX Runtime's mobile format, model.ort) or 'onnx' (model.onnx; "
                     "the QNN EP's portable QDQ model, next to its EPContext model).", "ort", ("ort", "onnx"))
    target_platform: str = _f(
        "Platform the ORT-format conversion optimizes for; 'arm' keeps x86-only fusions out.", "arm", ("arm", "amd64")
    )
    zip: bool = _f("Also write <package>/<package>.zip inside the package folder (verify checks it).", True)
    max_size_ratio: float = _f(
        "Largest model file allowed, as a fraction of the FP32 ONNX export (0.40: a 90.4 MB MiniLM must fit in "
        "36.2 MB). Over it, the export fails and writes no package.", 0.40, minimum=0.0,
    )
    verify_samples: int = _f("Texts from the evaluation split stored with reference outputs for 'edgeq verify'.", 4,
                             minimum=1)
    verify_min_cosine: float = _f(
        "Minimum cosine between a verify run's pooled outputs and the stored reference outputs.", 0.9999,
        minimum=0.0, maximum=1.0,
    )
    verify_max_rel_diff: float = _f(
        "Largest |output - reference| allowed, relative to the largest |reference| (catches a change of scale, "
        "which cosine does not see).", 0.01, minimum=0.0,
    )
    device_min_cosine: float = _f(
        "Expected agreement (cosine, every stored sample) between a device target's pooled outputs ('edgeq verify "
        "--on arm64') and the building host's stored reference. Reported, not gated: a device check holds the "
        "target to FP32 by the accuracy budget, and an x86 host is no reference for ARM (an AVX2-only x86 saturates "
        "int8 sums). Gated only for packages written before they stored FP32 outputs.", 0.999,
        minimum=0.0, maximum=1.0,
    )
    device_max_rel_diff: float = _f(
        "Expected largest |device output - host reference| relative to the largest |reference| (reported like "
        "device_min_cosine).", 0.05,
        minimum=0.0,
    )
    matmulnbits_accuracy_level: int = _f(
        "accuracy_level of the 8-bit MatMulNBits that ONNX Runtime's converter fuses int8 weight-only layers into. "
        "4 quantizes activations to int8 per 32-value block at run time, and x86 and ARM kernels round them "
        "differently (MiniLM: min per-sample cosine arm64 vs x86 0.9945 at 4, 0.9993 at 0 on 16 texts, though each "
        "CPU is as close to FP32 at 4 as at 0); 0 computes in float, which both architectures do alike, but ONNX "
        "Runtime has no float kernel for 8-bit blocks and dequantizes the whole weight on every call (MiniLM on x86: "
        "5.4 ms per sentence at 0, 1.9 at 4, FP32 3.0; bench/encoder_speed.py). Device checks hold each CPU to FP32 "
        "on that CPU, so 4 is the CPU profiles' choice.", 0, (0, 1, 2, 3, 4),
    )
    partition_check_eps: tuple[str, ...] = _f(
        "Execution providers whose partitioning ONNX Runtime's mobile usability checker estimates for the package's "
        "model; the manifest records nodes per EP, partitions and the checker's verdict for each.", (),
        ("NNAPI", "CoreML-NeuralNetwork", "CoreML-MLProgram"),
    )


@dataclass(frozen=True)
class AccuracyBudget:
    """The accuracy the package must keep against the FP32 model on the held-back evaluation split."""

    min_mean_cosine: float = _f("Minimum mean cosine of mean-pooled embeddings against FP32.", 0.995, minimum=0.0)
    min_min_cosine: float = _f("Minimum cosine on the worst evaluation text.", 0.98, minimum=0.0)
    min_retrieval_top1: float = _f(
        "Minimum fraction of evaluation texts whose nearest neighbour (cosine, among the other texts) is "
        "the same as with FP32 embeddings.",
        0.95,
        minimum=0.0,
    )
    eval_samples: int = _f("Evaluation texts used (all of the bundled split is 320).", 320, minimum=2)
    eval_seq_len: int = _f("Maximum tokens per evaluation text (QNN profiles use qnn.seq_len, their static shape).", 128,
                           minimum=8)


@dataclass(frozen=True)
class LLMSpec:
    """Causal LMs: INT4 weight-only linear layers (MatMulNBits), FP16 embeddings/norms, a GenAI package."""

    int4_method: str = _f(
        "How INT4 weights are chosen: 'gptq' (data-aware, from activation statistics over calibration text) or "
        "'rtn' (round to nearest; fast, less accurate).", "gptq", INT4_METHODS,
    )
    block_size: int = _f("Weights per INT4 scale (MatMulNBits block_size).", 32, (16, 32, 64, 128, 256))
    symmetric: bool = _f("Symmetric INT4 blocks (no zero points) instead of asymmetric.", False)
    accuracy_level: int = _f(
        "MatMulNBits accuracy_level: 4 computes with int8-quantized activations (fast int8 dot products on ARM), "
        "0 keeps float activations.", 4, (0, 1, 2, 3, 4),
    )
    embedding_precision: str = _f(
        "Token-embedding table precision. 'int8': 8-bit blocks of llm.block_size, gathered by GatherBlockQuantized "
        "(about 0.56x the FP16 bytes at block 32); with tied weights the head reads the same codes, one copy, so it "
        "needs lm_head_precision = 'int8'.", "fp16", precision_of=(CAUSAL_LM, "embedding"))
    lm_head_precision: str = _f(
        "Output projection precision. With tied weights 'fp16' shares the embedding table (smallest file); "
        "'int4'/'int8' store a separate low-bit head that reads far fewer bytes per token.", "fp16",
        ("fp16", "int8", "int4"), precision_of=(CAUSAL_LM, LM_HEAD),
    )
    int8_kv: bool = _f(
        "Give the K/V projections (the MatMuls that write the KV cache) 8-bit MatMulNBits weights: INT4 error there "
        "reaches every later token's attention (SmolLM2-135M: v_proj alone in FP32 halves the KL to FP32).", True,
    )
    promote: float = _f(
        "Also give 8 bits to any layer whose INT4 relative output error on calibration data is above this multiple "
        "of the median layer's (0 = none). Promotions stop where they would cross max_bits_per_weight or max_size_mb.", 2.0, minimum=0.0,
    )
    calibration_windows: int = _f("Calibration windows of window_tokens tokens each.", 8, minimum=1)
    window_tokens: int = _f("Tokens per calibration/evaluation window.", 512, minimum=16)
    eval_windows: int = _f("Held-back evaluation windows (at most what the evaluation split gives).", 16, minimum=1)
    context_length: int = _f("max_length written to genai_config.json.", 2048, minimum=16)
    max_ppl_increase: float = _f("Largest perplexity increase over FP32 on held-back text (0.06 = +6%).", 0.06,
                                 minimum=0.0)
    min_top1_agreement: float = _f("Smallest top-1 next-token agreement with FP32 on held-back text.", 0.80,
                                   minimum=0.0, maximum=1.0)
    max_bits_per_weight: float = _f(
        "Largest average stored bits per weight of the quantized linear layers (codes, scales and zero points over "
        "their K x N weights; the embedding table, and a head that reads it, are counted apart at their own "
        "precision). Relative to the model, so it suits every size; 8-bit promotions are taken only while it holds. "
        "INT4 asymmetric block 32 alone is 5.125, INT8 9.25.", 6.5, minimum=1.0, maximum=32.0)
    max_size_mb: float = _f(
        "Largest model (all weight files) in MB, an absolute cap on top of max_bits_per_weight; 0 = none "
        "('--max-size-mb').", 0.0, minimum=0.0)
    verify_tokens: int = _f("Greedy tokens generated for a fixed prompt and stored for 'edgeq verify'.", 16,
                            minimum=1)


@dataclass(frozen=True)
class QNNSpec:
    """Qualcomm Hexagon NPU (QNN EP, HTP backend): static shapes, QDQ with 16-bit activations, an EPContext binary."""

    seq_len: int = _f(
        "Static sequence length of the model (HTP graphs have fixed shapes): every input is padded or truncated to it.",
        128, minimum=8, maximum=512,
    )
    batch_size: int = _f("Static batch size.", 1, minimum=1, maximum=64)
    activation_bits: int = _f(
        "Bits of quantized activations (asymmetric, unsigned). 16: HTP's fixed-point path keeps softmax and "
        "LayerNorm ranges; 8-bit activations are the fastest but cost the most accuracy.", 16, (8, 16),
    )
    weight_bits: int = _f("Default bits of linear-layer weights (per tensor: QNN has no per-channel MatMul).", 8,
                          (8, 16))
    sensitive_weight_bits: int = _f(
        "Bits of the weights of linear layers promoted for accuracy (symmetric int16: what HTP's 16x16 "
        "FullyConnected takes; needs htp_arch >= 73).", 16, (8, 16),
    )
    sensitivity_target_mean_cosine: float = _f(
        "Linear layers are promoted to sensitive_weight_bits, worst 8-bit weight SQNR first, until the mean cosine "
        "against FP32 on calibration text reaches this.", 0.998, minimum=0.0, maximum=1.0,
    )
    calibration_samples: int = _f("Calibration texts (one static-shape run each; activation ranges are min/max).",
                                  64, minimum=1)
    selection_samples: int = _f("Calibration texts scored for each candidate set of promoted layers.", 32, minimum=2)
    mask_bias: float = _f(
        "Value that replaces the float32-minimum (-3.4e38) additive attention-mask bias. Quantized, -3.4e38 takes "
        "the whole range of every tensor it reaches (MiniLM: mean cosine 0.378); exp(-100) is 0 in float32 softmax "
        "and keeps the masked scores' range within ~110, 0.002 per step at 16 bits.", -100.0, maximum=-10.0,
    )
    soc_model: int = _f(
        "QNN soc_model the EPContext binary is compiled for (57 = Snapdragon 8 Gen 3, SM8650; 43 = 8 Gen 2; "
        "69 = 8 Elite).", 57, minimum=0,
    )
    htp_arch: int = _f("Hexagon architecture of that SoC (73, 75, 79, ...); 16-bit weights need >= 73.", 75,
                       (68, 69, 73, 75, 79, 81))
    verify_samples: int = _f(
        "Evaluation texts run on the HTP simulator with CPU fallback disabled (about 1 s each at 64 tokens on this "
        "x86 host); their cosine against FP32 is gated like the accuracy budget.", 8, minimum=1,
    )


@dataclass(frozen=True)
class Profile:
    """A device target: where the package runs and how it is quantized, packaged and judged."""

    name: str = _f("Profile name, as given to --profile.")
    description: str = _f("One line on what the profile is for.")
    target: str = _f("The device class and runtime the package is built for.")
    execution_provider: str = _f(
        "ONNX Runtime execution provider the package is built and verified for.",
        CPU_EP,
        (CPU_EP, QNN_EP),
    )
    model_kinds: tuple[str, ...] = _f("Model kinds the profile accepts.", ("encoder",))
    status: str = _f(
        "'supported', or 'deprecated' (the profile still works, but its target is on its way out; see note). "
        "Shown by 'edgeq profiles'.", "supported", ("supported", "deprecated"),
    )
    note: str = _f("A line shown by 'edgeq profiles' under the profile (why it is deprecated, what to use).", "")
    quantization: QuantizationSpec = _f("See [quantization].", default_factory=QuantizationSpec)
    package: PackageSpec = _f("See [package].", default_factory=PackageSpec)
    accuracy: AccuracyBudget = _f("See [accuracy].", default_factory=AccuracyBudget)
    llm: LLMSpec = _f("See [llm].", default_factory=LLMSpec)
    qnn: QNNSpec = _f("See [qnn] (execution_provider = 'QNNExecutionProvider' only).", default_factory=QNNSpec)
    source: str = field(default="", metadata={"doc": "File the profile was read from (set by the loader)."})
    sha256: str = field(default="", metadata={"doc": "sha256 of the profile file (set by the loader)."})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_LOADER_FIELDS = {"source", "sha256"}


def known_profiles(profiles_dir: Path = PROFILES_DIR) -> dict[str, Path]:
    """Profile name -> file, for every ``*.toml`` in the profiles folder."""
    return {p.stem: p for p in sorted(profiles_dir.glob("*.toml"))}


def load_profile(name_or_path: str, profiles_dir: Path = PROFILES_DIR, overrides: dict[str, object] | None = None) -> Profile:
    """Load a profile by name (from ``export_profiles/``) or from a path to a ``.toml`` file.

    ``overrides`` maps dotted keys (``llm.symmetric``) to values set over the file's, validated like the file's own
    (the command line's ``--set``)."""
    path = Path(name_or_path)
    if path.suffix == ".toml" and not path.is_file():
        raise ProfileError(f"profile file {path} does not exist", "pass an existing .toml file or a profile name")
    if path.suffix != ".toml":
        known = known_profiles(profiles_dir)
        if name_or_path not in known:
            close = difflib.get_close_matches(name_or_path, list(known), n=1)
            hint = f"known profiles: {', '.join(known) or '(none)'}"
            if close:
                hint = f"did you mean '{close[0]}'? " + hint
            raise ProfileError(f"unknown profile '{name_or_path}'", hint + " (or pass a path to a .toml file)")
        path = known[name_or_path]
    raw = path.read_bytes()
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"profile {path} is not valid TOML: {exc}", "fix the syntax at the position given") from exc
    if overrides:
        known = [k for k, _, _ in describe_fields()]
        for key in overrides:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1, cutoff=0.8)
                raise ProfileError(f"--set {key}: no such profile key",
                                   f"did you mean '{close[0]}'?" if close else "keys: edgeq profiles --fields")
    for key, value in (overrides or {}).items():
        *sections, leaf = key.split(".")
        table = data
        for sec in sections:
            table = table.setdefault(sec, {})
            if not isinstance(table, dict):
                raise ProfileError(f"--set {key}: '{sec}' is not a section", "set a key inside a section: SECTION.KEY=VALUE")
        table[leaf] = value
    shown = Path(f"{path} with --set {', '.join(overrides)}") if overrides else path
    profile = _build(Profile, data, shown, "")
    check_profile_name(profile.name, shown)
    _check_provider(profile, shown)
    _check_llm(profile, shown)
    return dataclasses.replace(profile, source=str(path), sha256=hashlib.sha256(raw).hexdigest())


def parse_setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` from the command line -> (key, value): the value read as a TOML value (true, 64, 0.1, "x",
    [..]), or as a plain string when it is not one (``llm.int4_method=rtn``)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ProfileError(f"--set {text!r} is not KEY=VALUE", "e.g. --set llm.symmetric=true (keys: edgeq profiles --fields)")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key.strip(), parsed


# The name becomes part of a folder name, OUT/<model>-<name>, which 'export --force' replaces: a name with a path
# separator or '..' (x/../../victim) would point that replacement outside OUT.
PROFILE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def check_profile_name(name: str, path: Path) -> None:
    """A profile name is a plain file name: letters, digits, '.', '_' and '-', not starting with '.', no '..'."""
    if not PROFILE_NAME.fullmatch(name) or ".." in name:
        raise ProfileError(f"profile {path}: name {name!r} is not a plain name",
                           "use only letters, digits, '.', '_' and '-' (not first: '.'; no '..'), at most 128 "
                           "characters, e.g. name = \"my-phone\"")


def _check_llm(profile: Profile, path: Path) -> None:
    """LLM fields that must agree with each other (each is valid alone)."""
    llm = profile.llm
    if llm.embedding_precision == "int8" and llm.lm_head_precision != "int8":
        raise ProfileError(f"profile {path}: llm.embedding_precision = 'int8' with lm_head_precision = "
                           f"'{llm.lm_head_precision}': a tied head reads the 8-bit table's own codes",
                           "set llm.lm_head_precision = 'int8' too, or llm.embedding_precision = 'fp16'")


def _check_provider(profile: Profile, path: Path) -> None:
    """Fields that must agree with the execution provider (each is valid alone)."""
    want = "onnx" if profile.execution_provider == QNN_EP else "ort"
    if profile.package.format != want:
        raise ProfileError(f"profile {path}: package.format = '{profile.package.format}' does not fit execution_provider "
                           f"'{profile.execution_provider}'", f"set package.format = '{want}'")
    if profile.execution_provider == QNN_EP and "causal-lm" in profile.model_kinds:
        raise ProfileError(f"profile {path}: the QNN HTP chain takes encoders only", 'set model_kinds = ["encoder"]')


def _build(cls, data: dict, path: Path, where: str):
    if not isinstance(data, dict):
        raise ProfileError(f"profile {path}: [{where}] must be a table", f"write it as a [{where}] section")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in _LOADER_FIELDS}
    for key in data:
        if key not in fields:
            loc = f"{where}.{key}" if where else key
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.8)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys here: {', '.join(fields)}"
            raise ProfileError(f"profile {path}: unknown key '{loc}'", hint)
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        loc = f"{where}.{name}" if where else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProfileError(f"profile {path}: missing required key '{loc}'", f"add '{name} = ...': {f.metadata['doc']}")
            continue
        values[name] = _coerce(hints[name], data[name], f, path, loc)
    return cls(**values)


def _coerce(tp, value, f, path: Path, loc: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, loc)
    origin = typing.get_origin(tp)
    if origin is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ProfileError(f"profile {path}: '{loc}' must be a list of strings, got {value!r}", f.metadata["doc"])
        bad = [v for v in value if f.metadata.get("choices") and v not in f.metadata["choices"]]
        if bad:
            raise ProfileError(f"profile {path}: '{loc}' has {bad[0]!r}, not one of {', '.join(f.metadata['choices'])}",
                               f.metadata["doc"])
        return tuple(value)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise ProfileError(
            f"profile {path}: '{loc}' must be {tp.__name__}, got {type(value).__name__} {value!r}", f.metadata["doc"]
        )
    choices = f.metadata.get("choices") or ()
    if choices and value not in choices:
        kind_category = f.metadata.get("precision_of")
        implemented = (f" (the precisions a pass implements for '{kind_category[1]}' nodes in the {kind_category[0]} "
                       "recipe)") if kind_category else ""
        raise ProfileError(f"profile {path}: '{loc}' = {value!r} is not one of {', '.join(map(str, choices))}"
                           f"{implemented}", f.metadata["doc"])
    lo, hi = f.metadata.get("minimum"), f.metadata.get("maximum")
    bounds = f"between {lo} and {hi}" if lo is not None and hi is not None else f">= {lo}" if lo is not None else \
        f"<= {hi}" if hi is not None else "finite"
    if tp is float and not math.isfinite(value):  # TOML's nan/inf (and 1e400) are floats; no field means them
        raise ProfileError(f"profile {path}: '{loc}' = {value!r} is not a finite number",
                           f"set a number {bounds}: {f.metadata['doc']}")
    # written so that a value no comparison holds for (NaN) fails too
    if not ((lo is None or lo <= value) and (hi is None or value <= hi)):
        raise ProfileError(f"profile {path}: '{loc}' = {value!r} is out of range (must be {bounds})", f.metadata["doc"])
    return float(value) if tp is float else value


def describe_fields(cls=Profile, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) for every field, nested sections flattened as ``section.key``."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in _LOADER_FIELDS:
            continue
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            rows += describe_fields(hints[f.name], key + ".")
            continue
        default = "" if f.default is dataclasses.MISSING else repr(f.default)
        rows.append((key, default, f.metadata["doc"]))
    return rows

