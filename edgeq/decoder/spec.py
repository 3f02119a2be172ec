"""``DecoderSpec``: what the graph builder needs from a causal LM's config.json, per supported family.

Defaults for keys a config.json may omit are transformers 4.57's class defaults for that family (5.x's are the
same). The rotary settings are read in both spellings (``rope_settings``): 4.x's rope_theta and rope_scaling, 5.x's
rope_parameters. Anything the builder cannot reproduce exactly (an unknown rope type, bidirectional attention, a
sliding window layout it does not know) is refused with ``UnsupportedModelError`` naming the key, never approximated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from edgeq.decoder.rope import KINDS, RotaryTable
from edgeq.errors import UnsupportedModelError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "gemma", "gemma3_text", "phi3")
# onnxruntime-genai 0.18's model.type for each family (src/models/model_type.h)
RUNTIME_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "smollm3": "smollm3",
                 "gemma": "gemma", "gemma3_text": "gemma3_text", "phi3": "phi3"}
# transformers 4.57's defaults for the keys below where a family's config class has its own
_DEFAULTS: dict[str, dict] = {
    "llama": dict(tie_word_embeddings=False, rope_theta=10000.0, hidden_act="silu"),
    "mistral": dict(tie_word_embeddings=False, rope_theta=10000.0, hidden_act="silu", sliding_window=4096),
    "qwen2": dict(tie_word_embeddings=False, rope_theta=10000.0, hidden_act="silu", sliding_window=4096),
    "qwen3": dict(tie_word_embeddings=False, rope_theta=10000.0, hidden_act="silu"),
    "smollm3": dict(tie_word_embeddings=True, rope_theta=2000000.0, hidden_act="silu", no_rope_layer_interval=4),
    "gemma": dict(tie_word_embeddings=True, rope_theta=10000.0, hidden_act="gelu_pytorch_tanh", head_dim=256,
                  rms_norm_eps=1e-6),
    "gemma3_text": dict(tie_word_embeddings=True, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                        hidden_activation="gelu_pytorch_tanh",
                        query_pre_attn_scalar=256, sliding_window=4096, head_dim=256, rms_norm_eps=1e-6),
    "phi3": dict(tie_word_embeddings=False, rope_theta=10000.0, hidden_act="silu", rms_norm_eps=1e-5,
                 original_max_position_embeddings=4096),
}
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "gelu": "gelu"}


@dataclass(frozen=True)
class DecoderSpec:
    """One decoder-only model's shape and arithmetic, read from its config.json."""

    model_type: str
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    norm_eps: float
    max_positions: int
    activation: str  # "silu" | "gelu_tanh" | "gelu"
    norm_offset: float = 0.0  # Gemma scales by (1 + w): the offset is added to every norm weight on load
    qkv_bias: bool = False
    qk_norm: bool = False  # Qwen3/Gemma-3: RMSNorm over each head of q and k before rotary
    sandwich_norms: bool = False  # Gemma-3: norms after attention and after the MLP too (4 per layer)
    fused_checkpoint: bool = False  # Phi-3: qkv_proj and gate_up_proj stored packed
    embedding_scale: float = 1.0
    tied: bool = False
    attention_scale: float = 1.0
    attention_softcap: float = 0.0  # 0: none
    final_softcap: float = 0.0  # 0: none
    rotary: tuple[RotaryTable, ...] = ()
    layer_rotary: tuple[int | None, ...] = ()  # per layer: index into ``rotary``, None for a NoPE layer
    layer_window: tuple[int | None, ...] = ()  # per layer: sliding window (tokens attended, self included) or None
    config: Mapping = field(default_factory=dict, compare=False, repr=False)  # the config.json it was read from

    @property
    def runtime_type(self) -> str:
        return RUNTIME_TYPES[self.model_type]

    @property
    def max_context(self) -> int:
        """The longest context a package can have: max_position_embeddings, or a LongRoPE model's original length
        (beyond it transformers switches to the long factors mid-generation, which one table cannot follow)."""
        longrope = [t.original_max_positions for t in self.rotary if t.kind == "longrope"]
        return min([self.max_positions, *longrope])

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim


def _refuse(what: str, fix: str) -> UnsupportedModelError:
    return UnsupportedModelError(what, fix)


def _int(config: Mapping, key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _refuse(f"config.json's {key} is {value!r}, not a positive integer", f"fix {key} in config.json")
    return value


def _num(config: Mapping, key: str, where: str = "config.json's") -> float:
    """A positive finite number from a stranger's config (a string, null or 0 here is an error, not a traceback)."""
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _refuse(f"{where} {key} is {value!r}, not a positive number", f"fix {key} in config.json")
    return float(value)


@dataclass(frozen=True)
class RopeSettings:
    """One rotary table as config.json states it: its base, and its type with the scaling keys."""

    key: str  # the top-level key the settings were read from: rope_scaling (transformers 4.x) or rope_parameters (5.x)
    theta: float
    values: Mapping  # rope_type (or 4.x's "type"), the scaling keys, maybe partial_rotary_factor; empty: plain RoPE
    part: str = ""  # Gemma-3's layer type, when rope_parameters is nested by it

    @property
    def kind(self) -> str:
        return self.values.get("rope_type", self.values.get("type", "default"))

    @property
    def where(self) -> str:
        return f"config.json's {self.key}" + (f" {self.part}" if self.part else "")


def _object(value, what: str, key: str) -> Mapping:
    """config.json's ``what`` (under its top-level ``key``) as a mapping; None is an empty one."""
    if value is not None and not isinstance(value, Mapping):
        raise _refuse(f"config.json's {what} is {value!r}, not an object", f"fix {key} in config.json")
    return value or {}


def _settings(key: str, values: Mapping, config: Mapping, base_key: str, part: str = "") -> RopeSettings:
    """The base is inside the settings (where transformers 5 keeps rope_theta), else config.json's ``base_key``."""
    where = f"config.json's {key}" + (f" {part}" if part else "")
    theta = _num(values, "rope_theta", where) if "rope_theta" in values else _num(config, base_key)
    return RopeSettings(key, theta, values, part)


def rope_settings(config: Mapping, model_type: str) -> dict[str, RopeSettings]:
    """Each rotary table's settings by name: "" for one table, Gemma-3's "full_attention" and "sliding_attention".

    config.json has two spellings, read as transformers 5 reads both: 5.x writes ``rope_parameters`` (rope_theta and
    partial_rotary_factor inside; Gemma-3's nested by layer type), 4.x wrote ``rope_theta`` and ``rope_scaling``
    beside the other keys (Gemma-3: ``rope_local_base_freq`` for its sliding layers); a ``rope_scaling`` present
    wins. transformers 4.57 ignores ``rope_parameters`` (a 5.x config would run there as plain RoPE): the file's
    meaning decides, not the installed transformers. ``config`` holds the family's defaults already."""
    scaling = _object(config.get("rope_scaling"), "rope_scaling", "rope_scaling")
    parameters = _object(config.get("rope_parameters"), "rope_parameters", "rope_parameters")
    if model_type != "gemma3_text":
        key = "rope_scaling" if scaling else "rope_parameters"
        return {"": _settings(key, scaling or parameters, config, "rope_theta")}
    tables = {}
    for part, base_key in (("full_attention", "rope_theta"), ("sliding_attention", "rope_local_base_freq")):
        values = _object(parameters.get(part), f"rope_parameters {part}", "rope_parameters")
        if part == "full_attention" and scaling:  # as transformers 5: rope_scaling updates the global layers' entry
            tables[part] = _settings("rope_scaling", dict(values) | dict(scaling), config, base_key)
        else:
            tables[part] = _settings("rope_parameters", values, config, base_key, part)
    return tables


def _rope_table(config: Mapping, rope: RopeSettings, dim: int) -> RotaryTable:
    kind, theta, where, values = rope.kind, rope.theta, rope.where, rope.values
    if kind not in KINDS:
        raise _refuse(f"{where} type {kind!r} is not supported by edgeq's decoder builder",
                      f"supported rope types: {', '.join(KINDS)}")
    if kind == "default":
        return RotaryTable(theta, dim)
    if kind == "linear":
        return RotaryTable(theta, dim, kind, factor=_num(values, "factor", where))
    if kind == "llama3":
        return RotaryTable(theta, dim, kind, factor=_num(values, "factor", where),
                           low_freq_factor=_num(values, "low_freq_factor", where),
                           high_freq_factor=_num(values, "high_freq_factor", where),
                           original_max_positions=_int(values, "original_max_position_embeddings"))
    return _longrope(config, rope, dim)


def _longrope(config: Mapping, rope: RopeSettings, dim: int) -> RotaryTable:
    values, where = rope.values, rope.where
    short, long = tuple(values.get("short_factor") or ()), tuple(values.get("long_factor") or ())
    if len(short) != dim // 2 or len(long) != dim // 2:
        raise _refuse(f"LongRoPE short_factor/long_factor have {len(short)}/{len(long)} entries, not rotary_dim/2 = "
                      f"{dim // 2}", f"fix {rope.key} in config.json")
    max_positions = _int(config, "max_position_embeddings")
    # the pretraining length: Phi-3 keeps it beside the other keys, where both transformers read it first
    top = bool(config.get("original_max_position_embeddings"))
    original = (_int(config, "original_max_position_embeddings") if top else
                _int(values, "original_max_position_embeddings") if values.get("original_max_position_embeddings")
                else max_positions)
    factor = _num(values, "factor", where) if values.get("factor") is not None else None
    ratio = max_positions / original
    if values.get("attention_factor") is not None:
        attention = _num(values, "attention_factor", where)
    else:
        if factor is not None and top and not math.isclose(factor, ratio):
            raise _refuse(f"{where} sets factor {factor:g} and config.json original_max_position_embeddings {original} "
                          f"(max_position_embeddings / it = {ratio:g}) but no attention_factor: transformers 4.57 "
                          "derives LongRoPE's attention factor from that ratio, 5.x from factor",
                          f"set attention_factor in {rope.key} (the value the model was trained with)")
        factor = ratio if factor is None else factor
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return RotaryTable(rope.theta, dim, "longrope", original_max_positions=int(original),
                       short_factor=tuple(float(x) for x in short), long_factor=tuple(float(x) for x in long),
                       attention_factor=float(attention))


def _rotary_dim(config: Mapping, rope: RopeSettings, head_dim: int) -> int:
    """Rotated dimensions per head: head_dim x partial_rotary_factor (transformers 5 keeps the factor in
    rope_parameters, 4.x beside the other keys); GroupQueryAttention needs half of it a multiple of 8."""
    inside = "partial_rotary_factor" in rope.values
    values, where = (rope.values, rope.where) if inside else (config, "config.json's")
    factor = _num(values, "partial_rotary_factor", where) if values.get("partial_rotary_factor") is not None else 1.0
    rotary_dim = int(head_dim * factor)
    if rotary_dim % 2 or rotary_dim < 2:
        raise _refuse(f"rotary dimension {rotary_dim} (head_dim x partial_rotary_factor) is not even",
                      "fix partial_rotary_factor in config.json")
    if (rotary_dim // 2) % 8:
        raise _refuse(f"rotary dimension {rotary_dim} (head_dim x partial_rotary_factor): ONNX Runtime's "
                      "GroupQueryAttention needs half of it to be a multiple of 8",
                      "no released checkpoint of the supported families has this shape; export it another way")
    return rotary_dim


def _layer_types(config: Mapping, layers: int) -> list[str] | None:
    types = config.get("layer_types")
    if types is None:
        return None
    if not isinstance(types, list) or len(types) != layers or set(types) - {"full_attention", "sliding_attention"}:
        raise _refuse(f"config.json's layer_types {types!r} is not one of full_attention/sliding_attention per layer",
                      "fix layer_types in config.json")
    return types


def _windows(config: Mapping, model_type: str, layers: int) -> tuple[int | None, ...]:
    """Per layer: the sliding window or None. Mistral and Phi-3 slide every layer when the config sets a window;
    Qwen2/Qwen3/SmolLM3 only with use_sliding_window, Gemma-3 on its sliding_attention layers."""
    window = config.get("sliding_window")
    if model_type in ("mistral", "phi3"):
        return tuple([_int(config, "sliding_window")] * layers) if window else (None,) * layers
    if model_type == "gemma3_text":
        if config.get("use_bidirectional_attention"):
            raise _refuse("Gemma-3 with use_bidirectional_attention is an encoder, not a causal LM",
                          "export a causal Gemma-3 checkpoint")
        pattern = _int({"sliding_window_pattern": 6} | dict(config), "sliding_window_pattern")
        types = _layer_types(config, layers) or [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
        window = _int(config, "sliding_window")
        return tuple(window if t == "sliding_attention" else None for t in types)
    if config.get("use_sliding_window") and window:
        raise _refuse(f"{model_type} with use_sliding_window=true is not supported by edgeq's decoder builder",
                      "export a checkpoint with use_sliding_window false (as the released ones are)")
    return (None,) * layers


def decoder_spec(config: Mapping) -> DecoderSpec:
    """The spec of a supported causal LM's config.json; UnsupportedModelError otherwise."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise _refuse(f"model_type {model_type!r} is not supported by edgeq's decoder builder",
                      f"supported: {', '.join(FAMILIES)}")
    config = _DEFAULTS[model_type] | dict(config)
    layers, hidden, heads = (_int(config, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads"))
    kv_heads = _int(config, "num_key_value_heads") if config.get("num_key_value_heads") is not None else heads
    head_dim = _int(config, "head_dim") if config.get("head_dim") is not None else hidden // heads
    if heads % kv_heads:
        raise _refuse(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}",
                      "fix config.json")
    # Gemma (1) computes with hidden_act in transformers 4.57 (released configs say "gelu": exact, not tanh);
    # hidden_activation is what the other families' configs that have it use
    act = config.get("hidden_act") if model_type == "gemma" else config.get("hidden_activation") or config.get("hidden_act")
    if act not in ACTIVATIONS:
        raise _refuse(f"activation {act!r} is not supported by edgeq's decoder builder",
                      f"supported: {', '.join(ACTIVATIONS)}")
    gemma = model_type == "gemma3_text"
    any_gemma = model_type in ("gemma", "gemma3_text")  # (1 + w) norms, embeddings scaled by sqrt(hidden)
    ropes = rope_settings(config, model_type)
    dims = {_rotary_dim(config, rope, head_dim) for rope in ropes.values()}
    if len(dims) > 1:
        raise _refuse(f"config.json's rope_parameters rotate {sorted(dims)} dimensions on different layers",
                      "no released checkpoint of the supported families does; export it another way")
    rotary_dim = dims.pop()
    tables = [_rope_table(config, rope, rotary_dim) for rope in ropes.values()]  # Gemma-3: full, then sliding
    windows = _windows(config, model_type, layers)
    layer_rotary: list[int | None] = [0] * layers
    if gemma:  # sliding layers use the local base (table 1), global ones the scaled table 0
        layer_rotary = [1 if w else 0 for w in windows]
    if model_type == "smollm3":
        interval = _int(config, "no_rope_layer_interval")
        flags = config.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(layers)]
        if not isinstance(flags, list) or len(flags) != layers:
            raise _refuse(f"config.json's no_rope_layers has {len(flags) if isinstance(flags, list) else flags!r} "
                          f"entries for {layers} layers", "fix no_rope_layers in config.json")
        layer_rotary = [0 if flag else None for flag in flags]
    scale = _num(config, "query_pre_attn_scalar") ** -0.5 if gemma else head_dim ** -0.5
    # transformers 4.57's Gemma-3 reads attn_logit_softcapping but never applies it (Gemma3Attention does not pass
    # it to the attention function); no supported family caps its scores, so GroupQueryAttention's softcap stays off
    attention_softcap = 0.0
    return DecoderSpec(
        model_type=model_type, num_layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
        intermediate=_int(config, "intermediate_size"), vocab=_int(config, "vocab_size"),
        norm_eps=_num(config, "rms_norm_eps") if "rms_norm_eps" in config else 1e-6, max_positions=_int(config, "max_position_embeddings"),
        activation=ACTIVATIONS[act], norm_offset=1.0 if any_gemma else 0.0,
        qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias")),
        qk_norm=model_type in ("qwen3", "gemma3_text"), sandwich_norms=gemma, fused_checkpoint=model_type == "phi3",
        embedding_scale=math.sqrt(hidden) if any_gemma else 1.0, tied=bool(config["tie_word_embeddings"]),
        attention_scale=scale, attention_softcap=attention_softcap,
        final_softcap=float(config.get("final_logit_softcapping") or 0.0), rotary=tuple(tables),
        layer_rotary=tuple(layer_rotary), layer_window=windows, config=dict(config))
