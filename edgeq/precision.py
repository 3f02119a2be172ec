"""Precision: the closed set of precisions edgeq writes, and the pass that carries each one out per recipe kind.

A precision is only a name unless some pass implements it for that kind of node: before this table a profile could
ask for ``sensitive_precision = "fp16"``, the manifest recorded fp16, and the layer stayed FP32. Profiles take their
allowed values from ``allowed(...)`` and the policy refuses to plan a precision no pass implements.
"""

from __future__ import annotations

from enum import StrEnum


class Precision(StrEnum):
    INT4 = "int4"  # MatMulNBits bits=4 (weight-only, blockwise)
    INT8 = "int8"  # encoder CPU: static int8 weights and activations (QDQ); causal LM: MatMulNBits bits=8
    INT8_WEIGHT_ONLY = "int8-weight-only"  # int8 weights, float activations
    INT8_PER_TOKEN = "int8-per-token"  # int8 weights, uint8 activations quantized per token at run time
    W8A16 = "w8a16"  # 8-bit weights, 16-bit activations
    W8A8 = "w8a8"
    W16A16 = "w16a16"  # QNN HTP: 16-bit symmetric weights, 16-bit activations
    W16A8 = "w16a8"
    W16 = "w16"  # QNN HTP: an embedding table quantized at the activation width
    W8 = "w8"
    A16 = "a16"  # QNN HTP: a node without weights, its activations QDQ at 16 bits
    A8 = "a8"
    FP16 = "fp16"
    FP32 = "fp32"


ENCODER_CPU, ENCODER_QNN, CAUSAL_LM = "encoder-cpu", "encoder-qnn", "causal-lm"
KINDS = (ENCODER_CPU, ENCODER_QNN, CAUSAL_LM)
KEPT = "none: the node stays as exported (FP32)"
LM_HEAD = "lm_head"  # a causal LM's output projection, decided apart from the other linear layers (tied weights)

_P = Precision
_QDQ_CPU = "QuantizeLinearLayers (edgeq/passes/quantize_linear.py)"
_FP16 = "KeepFp16 (edgeq/passes/keep_fp16.py)"
_INT4 = "quantize_linear: MatMulNBits, one decoder layer at a time (edgeq/decoder/layerwise.py)"
_FP16_TABLE = "write_decoder: the embedding table stored FP16 (edgeq/decoder/graph.py)"
_INT8_TABLE = ("write_decoder: the embedding table at 8 bits, gathered by GatherBlockQuantized; a tied head's "
               "MatMulNBits reads the same codes (edgeq/decoder/graph.py)")
_QNN = "write_qdq: ONNX Runtime's get_qnn_qdq_config + quantize (edgeq/qnn/quantize.py)"
_QNN_ACT = {_P.A16: _QNN, _P.A8: _QNN}

# (kind, op category of edgeq/categories.py, or LM_HEAD) -> precision -> the pass that carries it out.
# A category missing for a kind (e.g. "attention" on an encoder) has no node of that kind; "fp32" = left alone.
PASSES: dict[tuple[str, str], dict[Precision, str]] = {
    (ENCODER_CPU, "linear"): {_P.INT8: _QDQ_CPU, _P.INT8_WEIGHT_ONLY: _QDQ_CPU, _P.INT8_PER_TOKEN: _QDQ_CPU,
                                 _P.W8A16: _QDQ_CPU, _P.FP32: KEPT},
    (ENCODER_CPU, "embedding"): {_P.FP16: _FP16, _P.FP32: KEPT},
    (ENCODER_CPU, "norm"): {_P.FP16: _FP16, _P.FP32: KEPT},
    **{(ENCODER_CPU, c): {_P.FP32: KEPT} for c in ("attention", "attention_matmul", "attention_mask", "softmax",
                                                   "other")},
    (ENCODER_QNN, "linear"): {_P.W8A16: _QNN, _P.W16A16: _QNN, _P.W8A8: _QNN, _P.W16A8: _QNN},
    (ENCODER_QNN, "embedding"): {_P.W16: _QNN, _P.W8: _QNN},
    **{(ENCODER_QNN, c): _QNN_ACT for c in ("norm", "attention", "attention_matmul", "attention_mask", "softmax",
                                           "other")},
    (CAUSAL_LM, "linear"): {_P.INT4: _INT4, _P.INT8: _INT4, _P.FP32: KEPT},
    # the tied head (its Transpose and MatMul): FP32 only with an FP32 table, which it shares
    (CAUSAL_LM, LM_HEAD): {_P.FP16: _FP16_TABLE + ", which the tied head reads", _P.INT8: _INT4, _P.INT4: _INT4,
                           _P.FP32: KEPT},
    (CAUSAL_LM, "embedding"): {_P.FP16: _FP16_TABLE, _P.INT8: _INT8_TABLE, _P.FP32: KEPT},
    **{(CAUSAL_LM, c): {_P.FP32: KEPT} for c in ("norm", "attention", "attention_matmul", "attention_mask", "softmax",
                                                 "other")},
}


def allowed(kind: str, category: str) -> tuple[Precision, ...]:
    """The precisions some pass implements for ``category`` nodes of a ``kind`` model, in enum order."""
    return tuple(PASSES.get((kind, category), {}))


def implemented_by(precision: str, kind: str, category: str) -> str | None:
    """The pass that carries out ``precision`` for ``category`` nodes of a ``kind`` model, or None."""
    return PASSES.get((kind, category), {}).get(precision)


def check_implemented(precision: str, kind: str, category: str, node: str) -> Precision:
    """``precision`` as a Precision, or ValueError when no pass implements it here (a policy bug: profiles are
    checked when they load)."""
    if implemented_by(precision, kind, category) is None:
        raise ValueError(f"{node}: no pass implements {precision!r} for '{category}' nodes in the {kind} recipe "
                         f"(implemented: {', '.join(allowed(kind, category))})")
    return Precision(precision)
