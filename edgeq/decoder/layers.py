"""One decoder layer's weights in the layout the graph takes, read from a ``TensorSource`` one tensor at a time.

Linear weights are [K, N] (Hugging Face's [out, in] transposed: what MatMul multiplies by), float32, by role:
``qkv`` is [Wq | Wk | Wv] packed along N (one MatMul feeds GroupQueryAttention), ``o``, ``gate``, ``up``, ``down``.
Phi-3 stores qkv_proj and gate_up_proj packed already: the first is the same packing, the second is split. Norm
weights have Gemma's +1 offset added, so the graph's RMSNorm is the same for every family.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from edgeq.decoder.spec import DecoderSpec
from edgeq.decoder.weights import TensorSource
from edgeq.errors import ModelFolderError

ROLES = ("qkv", "o", "gate", "up", "down")
# norm name -> Hugging Face module under model.layers.N (Llama's post_attention_layernorm is the MLP's input norm;
# Gemma-3's is the norm of the attention output, and pre_feedforward_layernorm feeds its MLP)
NORMS = {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"}
SANDWICH_NORMS = {"attn_in": "input_layernorm", "attn_out": "post_attention_layernorm",
                  "mlp_in": "pre_feedforward_layernorm", "mlp_out": "post_feedforward_layernorm"}
QK_NORMS = {"q": "self_attn.q_norm", "k": "self_attn.k_norm"}

@dataclass(frozen=True)
class QuantizedLinear:
    """A linear as ONNX Runtime's MatMulNBits takes it: B packed [N, K/block, block*bits/8] uint8, scales
    [N * K/block] float32, zero points packed uint8 or None (symmetric)."""

    b: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    k: int
    n: int
    bits: int = 4
    block_size: int = 32
    accuracy_level: int = 4


Weight = Union[np.ndarray, QuantizedLinear]


@dataclass(frozen=True)
class LayerWeights:
    """Decoder layer ``index``: linears by role ([K, N] float32, or quantized), biases by role ([N]), norms."""

    index: int
    linears: Mapping[str, Weight]
    biases: Mapping[str, np.ndarray] = field(default_factory=dict)
    norms: Mapping[str, np.ndarray] = field(default_factory=dict)


def _prefix(i: int) -> str:
    return f"model.layers.{i}."


def read_tensor(source: TensorSource, name: str) -> np.ndarray:
    try:
        return source.get(name)
    except KeyError:
        raise ModelFolderError(f"the checkpoint has no tensor {name}",
                               "pass the complete checkpoint (every shard the index names)") from None


def _linear(source: TensorSource, name: str) -> np.ndarray:
    return np.ascontiguousarray(read_tensor(source, name).T, dtype=np.float32)


def layer_weights(spec: DecoderSpec, source: TensorSource, i: int) -> LayerWeights:
    """Layer ``i``'s weights from ``source`` (about one layer's worth of float32 in memory)."""
    p = _prefix(i)
    keys = frozenset(source.keys())
    attn, mlp = p + "self_attn.", p + "mlp."
    if spec.fused_checkpoint:
        qkv = _linear(source, attn + "qkv_proj.weight")
        gate_up = _linear(source, mlp + "gate_up_proj.weight")
        gate, up = np.ascontiguousarray(gate_up[:, :spec.intermediate]), np.ascontiguousarray(
            gate_up[:, spec.intermediate:])
        del gate_up
    else:
        qkv = np.concatenate([_linear(source, attn + f"{x}_proj.weight") for x in "qkv"], axis=1)
        gate, up = _linear(source, mlp + "gate_proj.weight"), _linear(source, mlp + "up_proj.weight")
    linears = {"qkv": qkv, "o": _linear(source, attn + "o_proj.weight"), "gate": gate, "up": up,
               "down": _linear(source, mlp + "down_proj.weight")}
    biases = _biases(spec, source, keys, attn, mlp)
    names = SANDWICH_NORMS if spec.sandwich_norms else NORMS
    norms = {k: read_tensor(source, p + v + ".weight") + np.float32(spec.norm_offset) for k, v in names.items()}
    if spec.qk_norm:
        norms |= {k: read_tensor(source, p + v + ".weight") + np.float32(spec.norm_offset) for k, v in QK_NORMS.items()}
    for role, w in linears.items():
        _check_shape(spec, i, role, w)
    return LayerWeights(i, linears, biases, {k: v.astype(np.float32) for k, v in norms.items()})


def _biases(spec: DecoderSpec, source: TensorSource, keys: frozenset[str], attn: str, mlp: str) -> dict:
    """Biases wherever the checkpoint has them (Qwen2's q/k/v; Llama's attention_bias/mlp_bias): a missing part of
    the packed q/k/v bias is zeros."""
    biases = {}
    widths = {"q": spec.q_size, "k": spec.kv_size, "v": spec.kv_size}
    parts = {x: attn + f"{x}_proj.bias" for x in "qkv"}
    if any(name in keys for name in parts.values()):
        biases["qkv"] = np.concatenate([read_tensor(source, parts[x]) if parts[x] in keys else
                                        np.zeros(widths[x], np.float32) for x in "qkv"]).astype(np.float32)
    for role, name in (("o", attn + "o_proj.bias"), ("gate", mlp + "gate_proj.bias"), ("up", mlp + "up_proj.bias"),
                       ("down", mlp + "down_proj.bias")):
        if name in keys:
            biases[role] = read_tensor(source, name).astype(np.float32)
    return biases


def expected_shapes(spec: DecoderSpec) -> dict[str, tuple[int, int]]:
    """Each role's [K, N]."""
    return {"qkv": (spec.hidden, spec.q_size + 2 * spec.kv_size), "o": (spec.q_size, spec.hidden),
            "gate": (spec.hidden, spec.intermediate), "up": (spec.hidden, spec.intermediate),
            "down": (spec.intermediate, spec.hidden)}


def _check_shape(spec: DecoderSpec, i: int, role: str, w: np.ndarray) -> None:
    want = expected_shapes(spec)[role]
    if w.shape != want:
        raise ModelFolderError(f"layer {i} {role} weight has shape {w.shape} (as [K, N]), config.json implies {want}",
                               "the checkpoint and its config.json do not match")
