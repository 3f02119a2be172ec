"""The longest token sequence a causal LM's package computes as the source model does, read from the source's own
config before any work: ``llm.window_tokens`` and ``llm.context_length`` above it fail up front, with the ``--set``
that fixes them, instead of as an ONNX Runtime traceback mid-run or after quantization.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from edgeq.errors import ModelFolderError, UserInputError
from edgeq.modelsource import ModelSource, read_gguf_info
from edgeq.profiles import LLMSpec


@dataclass(frozen=True)
class PositionCap:
    limit: int
    name: str  # the config value that sets it
    why: str = ""  # what goes wrong past it, when that is not plain


def position_caps(hf_config: dict) -> list[PositionCap]:
    """Every cap the config states, tightest first."""
    caps = []
    max_positions = hf_config.get("max_position_embeddings")
    if isinstance(max_positions, int) and max_positions > 0:  # the rotary tables hold this many positions
        caps.append(PositionCap(max_positions, "max_position_embeddings"))
    # A sliding window is no cap: edgeq.decoder's GroupQueryAttention applies it (local_window_size).
    # LongRoPE (Phi-3 128k / Phi-3.5) picks its short or long factors by sequence length; edgeq.decoder builds
    # the short ones, which transformers uses only up to original_max_position_embeddings.
    # rope_scaling (transformers 4.x) wins over rope_parameters (5.x), as transformers 5 reads them
    rope = hf_config.get("rope_scaling") or hf_config.get("rope_parameters")
    rope = rope if isinstance(rope, dict) else {}  # a stranger's config may hold anything here
    original = hf_config.get("original_max_position_embeddings")
    if rope.get("rope_type", rope.get("type")) == "longrope" and isinstance(original, int) and original > 0:
        caps.append(PositionCap(original, "original_max_position_embeddings",
                                " (a LongRoPE model: the package holds only the short factors)"))
    return sorted(caps, key=lambda c: c.limit)


def check_length(caps: list[PositionCap], key: str, value: int) -> None:
    """``value`` (the profile's ``key``) must fit every cap."""
    if caps and value > caps[0].limit:
        cap = caps[0]
        raise UserInputError(f"{key} = {value} exceeds the model's {cap.name} {cap.limit}{cap.why}",
                             f"pass --set {key}={cap.limit} (or less)")


def source_caps(source: ModelSource) -> list[PositionCap]:
    """The caps of a source folder: from config.json, or from a GGUF's metadata."""
    if source.gguf_file:
        info = read_gguf_info(source.path / source.gguf_file)
        if info.context_length is None or info.context_length <= 0:
            return []
        return [PositionCap(info.context_length, f"{info.architecture}.context_length (GGUF metadata)")]
    path = source.path / "config.json"
    try:
        return position_caps(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:  # inspect_model_dir parsed it a moment ago
        raise ModelFolderError(f"{path} cannot be read: {exc}", "restore the config.json the model came with") from exc


def check_llm_lengths(source: ModelSource, spec: LLMSpec) -> None:
    caps = source_caps(source)
    check_length(caps, "llm.window_tokens", spec.window_tokens)
    check_length(caps, "llm.context_length", spec.context_length)
