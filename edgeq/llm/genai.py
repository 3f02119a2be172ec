"""ONNX Runtime GenAI packaging: genai_config.json for a decoder with the KV-cache I/O (edgeq.decoder's), and
generation through it.

A package folder is what ``onnxruntime_genai.Model(folder)`` loads: ``genai_config.json``, the ONNX decoder it names,
and the tokenizer files (written by :mod:`edgeq.llm.tokenizer`). onnxruntime-genai 0.18 rejects any config key its
parser (``src/config.cpp``) does not know, so only that parser's keys are written, in its model builder's layout.
``past_present_share_buffer`` is on only when GroupQueryAttention writes every ``present.N`` (edgeq.decoder's
graphs: every layer): a graph that grows the cache by Concat breaks a shared buffer. The measured failures behind both: see
docs/decisions/genai-packaging.md.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

from edgeq.errors import EdgeqError, PackageError, UnsupportedModelError, UserInputError
from edgeq.families import CAUSAL_LM, by_model_type, supported_model_types
from edgeq.llm.limits import check_length, position_caps
from edgeq.manifest import REEXPORT, package_path, read_package_json

GENAI_CONFIG = "genai_config.json"
# The session options edgeq writes. onnxruntime-genai reads more (custom_ops_library: a shared library it loads;
# provider options naming backend libraries): from a stranger's package that would run native code, so a package's
# config may hold only these, with no provider options. A profile that needs a provider must be allowed here.
SESSION_OPTION_KEYS = frozenset({"log_id", "provider_options"})
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"
_PAST_RE = re.compile(r"past_key_values\.(\d+)\.(key|value)")


@dataclass(frozen=True)
class DecoderIO:
    """What the exported decoder's graph inputs and outputs say about its KV cache."""

    num_layers: int
    kv_heads: int | None  # None where the export left the dimension symbolic
    head_size: int | None
    has_position_ids: bool
    group_query_attention: bool = False  # every layer a GroupQueryAttention: present shares the past buffer


def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def decoder_io(onnx_model: Path | onnx.ModelProto) -> DecoderIO:
    """Check the graph has optimum's decoder-with-past names and read the layer count and KV shape from it."""
    model = onnx_model
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(onnx_model), load_external_data=False)
    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    layers = sorted({int(m.group(1)) for name in inputs if (m := _PAST_RE.fullmatch(name))})
    expected_in = {"input_ids", "attention_mask"} | {p % i for i in range(len(layers)) for p in (PAST_KEY, PAST_VALUE)}
    expected_out = {"logits"} | {p % i for i in range(len(layers)) for p in (PRESENT_KEY, PRESENT_VALUE)}
    missing = sorted((expected_in - set(inputs)) | (expected_out - outputs))
    if not layers or missing or layers != list(range(len(layers))):
        raise UnsupportedModelError(
            "the ONNX decoder does not have the KV-cache inputs and outputs of optimum's text-generation-with-past "
            f"export (missing: {', '.join(missing) or 'past_key_values.N.key/value'})",
            "export the model with task text-generation-with-past",
        )
    dims = _dims(inputs[PAST_KEY % 0])
    kv_heads, head_size = (dims[1], dims[3]) if len(dims) == 4 else (None, None)
    return DecoderIO(len(layers), kv_heads if isinstance(kv_heads, int) else None,
                     head_size if isinstance(head_size, int) else None, "position_ids" in inputs,
                     _all_presents_from_gqa(model, len(layers)))


def _all_presents_from_gqa(model: onnx.ModelProto, layers: int) -> bool:
    """Every ``present.N`` is written by a GroupQueryAttention (which can share the past buffer). A partly fused
    graph (measured on SmolLM3, whose NoPE layers have no rotary to fuse) still grows the other layers' present by
    Concat, which a shared buffer breaks ('present.1.key' {1,2,52,16} vs computed {1,2,88,16})."""
    gqa_out = {o for n in model.graph.node if n.op_type == "GroupQueryAttention" for o in n.output}
    return all(p % i in gqa_out for i in range(layers) for p in (PRESENT_KEY, PRESENT_VALUE))


def _first(*values):
    return next((v for v in values if v is not None), None)


def special_token_ids(hf_config: dict, generation_config: dict | None) -> tuple[int, int | list[int], int]:
    """(bos, eos, pad): generation_config.json first (chat models often correct config.json's EOS there), then
    config.json; pad falls back to the first EOS, as transformers' generate does."""
    gen = generation_config or {}
    bos = _first(gen.get("bos_token_id"), hf_config.get("bos_token_id"))
    eos = _first(gen.get("eos_token_id"), hf_config.get("eos_token_id"))
    if eos is None or eos == []:
        raise UnsupportedModelError("neither generation_config.json nor config.json names an eos_token_id",
                                    "add eos_token_id to the model's generation_config.json")
    eos_list = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    pad = _first(gen.get("pad_token_id"), hf_config.get("pad_token_id"), eos_list[0])
    # onnxruntime-genai needs an integer bos; a model without one never sees it (the tokenizer does not add it).
    eos_out = int(eos_list[0]) if len(eos_list) == 1 else [int(e) for e in eos_list]
    return int(_first(bos, eos_list[0])), eos_out, int(pad)


def genai_model_type(model_type: str) -> str:
    """onnxruntime-genai's model.type for a Hugging Face model_type: the family's runtime type (edgeq.families).
    Input checks refuse other families before any work; this is the packaging's own guard."""
    family = by_model_type(model_type)
    if family is None or not family.supported or not family.runtime_type:
        raise UnsupportedModelError(f"onnxruntime-genai packaging does not support model_type '{model_type}'",
                                    f"supported: {', '.join(supported_model_types(CAUSAL_LM))}")
    return family.runtime_type


def genai_config(model_file: str, io: DecoderIO, hf_config: dict, generation_config: dict | None, *,
                 context_length: int, provider_options: Sequence[dict] = ()) -> dict:
    runtime_type = genai_model_type(hf_config.get("model_type", ""))
    heads = int(hf_config["num_attention_heads"])
    kv_heads = int(_first(hf_config.get("num_key_value_heads"), heads))
    head_size = int(_first(hf_config.get("head_dim"), hf_config["hidden_size"] // heads))
    layers = int(hf_config["num_hidden_layers"])
    graph = (io.num_layers, io.kv_heads or kv_heads, io.head_size or head_size)
    if graph != (layers, kv_heads, head_size):
        raise EdgeqError(f"the ONNX decoder (layers, kv heads, head size) = {graph} disagrees with config.json's "
                         f"{(layers, kv_heads, head_size)}", "this is an edgeq bug; please report it with config.json")
    if context_length < 1:
        raise UserInputError(f"context length {context_length} is not positive", "pass a context length of at least 1")
    check_length(position_caps(hf_config), "llm.context_length", context_length)  # export checks it up front too
    bos, eos, pad = special_token_ids(hf_config, generation_config)
    gen = generation_config or {}
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if io.has_position_ids:
        inputs["position_ids"] = "position_ids"
    inputs |= {"past_key_names": PAST_KEY, "past_value_names": PAST_VALUE}
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai",
                                    "provider_options": [dict(p) for p in provider_options]},
                "filename": model_file,
                "head_size": head_size,
                "hidden_size": int(hf_config["hidden_size"]),
                "inputs": inputs,
                "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": runtime_type,
            "vocab_size": int(hf_config["vocab_size"]),
        },
        "search": {
            # Greedy unless the app turns sampling on; the sampling values are the model's own recommendation.
            "do_sample": False,
            "early_stopping": True,
            "max_length": context_length,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # optimum's graph grows present by Concat; GroupQueryAttention writes into a shared buffer instead (same
            # tokens, ~8% faster decode at 256 tokens of context on SmolLM2; docs/decisions/genai-packaging.md).
            "past_present_share_buffer": io.group_query_attention,
            "repetition_penalty": float(gen.get("repetition_penalty", 1.0)),
            "temperature": float(gen.get("temperature", 1.0)),
            "top_k": int(gen.get("top_k", 50)),
            "top_p": float(gen.get("top_p", 1.0)),
        },
    }


def write_genai_config(out_dir: Path, model_file: str, onnx_model: Path | onnx.ModelProto, hf_config: dict,
                       generation_config: dict | None, *, context_length: int,
                       provider_options: Sequence[dict] = ()) -> Path:
    """Write ``out_dir/genai_config.json`` for the decoder ``model_file`` (relative to ``out_dir``).

    ``onnx_model`` is the decoder (path or loaded proto) whose I/O names and KV shape are checked; ``hf_config`` and
    ``generation_config`` are the source's config.json and generation_config.json as dicts; ``provider_options`` is
    onnxruntime-genai's list of ``{provider: {option: value}}`` (empty: CPU).
    """
    config = genai_config(model_file, decoder_io(onnx_model), hf_config, generation_config,
                          context_length=context_length, provider_options=provider_options)
    path = Path(out_dir) / GENAI_CONFIG
    path.write_text(json.dumps(config, indent=4) + "\n")
    return path


def _tokenizer(model):
    import onnxruntime_genai as og

    tok = og.Tokenizer(model)
    # onnxruntime-genai 0.18 encodes with add_special_tokens off unless told (Tokenizer::Encode), so BOS would be
    # dropped; on, the tokenizer adds exactly what tokenizer_config.json's add_bos_token/add_eos_token say.
    tok.update_options(add_special_tokens="true")
    return tok


def _generator(model, context_length: int, prompt_ids: Sequence[int], max_new_tokens: int, greedy: bool):
    import onnxruntime_genai as og

    if len(prompt_ids) + max_new_tokens > context_length:
        raise UserInputError(f"the prompt ({len(prompt_ids)} tokens) plus {max_new_tokens} new tokens exceeds the "
                             f"package's context length {context_length}", "shorten the prompt or ask for fewer tokens")
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=not greedy, max_length=len(prompt_ids) + max_new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens([int(t) for t in prompt_ids])
    return generator


def _walk_config(value, key: str = ""):
    """(key, value) of every entry of a JSON value, nested ones included."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k, v
            yield from _walk_config(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _walk_config(v, key)


def check_genai_config(package_dir: Path) -> dict:
    """The package's genai_config.json, checked before onnxruntime-genai reads it: every ``filename`` in it is a
    plain path to a file inside the package, session options are only those edgeq writes (no library to load, no
    provider), and the context length is a positive integer. PackageError otherwise."""
    path = package_path(package_dir, GENAI_CONFIG, GENAI_CONFIG)
    if not path.is_file():
        raise UserInputError(f"{package_dir} has no {GENAI_CONFIG}", "pass an onnxruntime-genai package folder")
    config = read_package_json(path)
    model = config.get("model") if isinstance(config, dict) else None
    context = model.get("context_length") if isinstance(model, dict) else None
    if not isinstance(context, int) or isinstance(context, bool) or context < 1:
        raise PackageError(f"{path} has no positive integer model.context_length", REEXPORT)
    for key, value in _walk_config(config):
        if key == "filename":
            if not package_path(package_dir, value, f"{GENAI_CONFIG} filename").is_file():
                raise PackageError(f"{path} names the model file {value!r}, which the package does not hold", REEXPORT)
        elif key == "session_options":
            extra = sorted(set(value) - SESSION_OPTION_KEYS) if isinstance(value, dict) else ["(not an object)"]
            if extra or value.get("provider_options", []) != []:
                raise PackageError(f"{path}: session_options {', '.join(extra) or 'provider_options'} is not one "
                                   "edgeq writes; a package may not name libraries or providers to load", REEXPORT)
    return config


def _load(package_dir: Path):
    """(og.Model, context length) for a package folder."""
    import onnxruntime_genai as og

    config = check_genai_config(package_dir)
    return og.Model(str(package_dir)), config["model"]["context_length"]


def generate(package_dir: Path, prompt: str, max_new_tokens: int, *, greedy: bool = True) -> Iterator[str]:
    """Stream the text onnxruntime-genai generates after ``prompt`` (BOS added as the source tokenizer does),
    one piece per generated token (empty while a character's UTF-8 bytes are incomplete); stops at EOS or after
    ``max_new_tokens``."""
    model, context_length = _load(package_dir)
    tok = _tokenizer(model)
    generator = _generator(model, context_length, tok.encode(prompt), max_new_tokens, greedy)
    stream = tok.create_stream()
    # The stream decoder emits a space for a special token (measured: <|im_end|> -> " "); the EOS that ends the
    # generation is not text, so it is not streamed.
    eos = {int(t) for t in tok.eos_token_ids}
    while not generator.is_done():
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        if token not in eos:
            yield stream.decode(token)


def greedy_tokens(package_dir: Path, prompt_ids: Sequence[int], n: int) -> list[int]:
    """The ``n`` token ids (fewer if EOS comes first, EOS included) greedy search appends to ``prompt_ids``."""
    model, context_length = _load(package_dir)
    generator = _generator(model, context_length, prompt_ids, n, greedy=True)
    out: list[int] = []
    while not generator.is_done():
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out


def chat_prompt(package_dir: Path, user_text: str) -> str:
    """``user_text`` as one user turn through the package's chat template (as onnxruntime-genai applies it), ready
    for generation; the text itself when the package has no template."""
    import onnxruntime_genai as og

    model, _ = _load(package_dir)
    tok = og.Tokenizer(model)
    try:
        return tok.apply_chat_template(messages=json.dumps([{"role": "user", "content": user_text}]),
                                       add_generation_prompt=True)
    except Exception:  # no chat template in the package: a base model takes plain text
        return user_text
