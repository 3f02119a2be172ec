"""Per-token int8 linear layers: int8 weights per output channel, uint8 activations quantized at run time with one
scale and zero point per token (row), as ONNX Runtime ops (ORT has no per-row-scale integer GEMM op).

Why: a static range per tensor is set by the rare outlier tokens of LayerNorm and GELU outputs, and MiniLM's most
sensitive layers lose accuracy under it; a per-token range follows each token. Measured on MiniLM's 320 held-back
texts (fake quantization, every linear layer): mean / min cosine 0.99900 / 0.99606, against 0.99552 / 0.98613 for
the 8 most sensitive layers alone with one dynamic range per tensor. The integer GEMM is MLAS's u8s8 kernel, several
times faster on x86 than the 8-bit ``MatMulNBits`` of int8 weight-only layers (384x1536 at 20 tokens, one thread:
~50 us against ~150 us; docs/decisions/encoder-quantization.md).

For rows x of X [M, K] and W [K, N] quantized as Wq * sw (symmetric, per column):
    s = (max(x, 0) - min(x, 0)) / 255,   z = round(-min(x, 0) / s),   xq = clip(round(x / s) + z, 0, 255)
    Y = s * (xq @ Wq - z * colsum(Wq)) * sw
ONNX Runtime fuses (xq @ Wq) * sw into ``MatMulIntegerToFloat``; the rest is elementwise over [M, N] or [M, 1].
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

EPS = np.float32(1e-12)  # an all-zero row: scale 1e-12, codes = zero point 0, output 0


def _reduce(op: str, x: str, out: str, name: str, opset: int) -> onnx.NodeProto:
    if opset >= 18:  # axes became an input in opset 18
        return helper.make_node(op, [x, "pt_axis1"], [out], name=name, keepdims=0)
    return helper.make_node(op, [x], [out], name=name, axes=[1], keepdims=0)


def constants(ks: set[int]) -> list[onnx.TensorProto]:
    """The constants every per-token activation shares (added once per model): ``pt_rows_K`` reshapes [..., K] to
    rows for each input width K in ``ks``."""
    return [numpy_helper.from_array(np.array([1], np.int64), "pt_axis1"),
            numpy_helper.from_array(np.array([-1], np.int64), "pt_minus1"),
            numpy_helper.from_array(np.array([0], np.int64), "pt_zero_i"),
            numpy_helper.from_array(np.float32(0), "pt_zero"),
            numpy_helper.from_array(np.float32(1 / 255), "pt_inv255"),
            numpy_helper.from_array(EPS, "pt_eps"),
            numpy_helper.from_array(np.float32(1), "pt_one"),
            numpy_helper.from_array(np.uint8(0), "pt_zero_u8"),
            *(numpy_helper.from_array(np.array([-1, k], np.int64), f"pt_rows_{k}") for k in sorted(ks))]


def activation_nodes(x: str, k: int, base: str, opset: int) -> list[onnx.NodeProto]:
    """Quantize ``x`` [..., K] per row: ``base``_q uint8 [M, K]; ``base``_s and ``base``_z float [M, 1] (scale and
    zero point); ``base``_prefix, x's shape without K (to shape the outputs back)."""
    b = base

    def n(op: str, inputs: list[str], out: str, **kw) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [f"{b}_{out}"], name=f"{b}_{out}_{op}", **kw)

    return [
        n("Shape", [x], "shape"),
        n("Slice", [f"{b}_shape", "pt_zero_i", "pt_minus1"], "prefix"),
        n("Reshape", [x, f"pt_rows_{k}"], "rows"),
        _reduce("ReduceMax", f"{b}_rows", f"{b}_hi0", f"{b}_hi0_ReduceMax", opset),
        _reduce("ReduceMin", f"{b}_rows", f"{b}_lo0", f"{b}_lo0_ReduceMin", opset),
        n("Max", [f"{b}_hi0", "pt_zero"], "hi"),  # zero in every range: its code is exact
        n("Min", [f"{b}_lo0", "pt_zero"], "lo"),
        n("Sub", [f"{b}_hi", f"{b}_lo"], "range"),
        n("Mul", [f"{b}_range", "pt_inv255"], "s0"),
        n("Max", [f"{b}_s0", "pt_eps"], "scale"),
        n("Div", [f"{b}_lo", f"{b}_scale"], "lodiv"),
        n("Neg", [f"{b}_lodiv"], "zneg"),
        n("Round", [f"{b}_zneg"], "zf"),  # in [0, 255]: lo <= 0 and scale >= -lo / 255
        n("Cast", [f"{b}_zf"], "z8", to=TensorProto.UINT8),
        n("QuantizeLinear", [f"{b}_rows", f"{b}_scale", f"{b}_z8"], "q", axis=0),  # one scale per row
        n("Unsqueeze", [f"{b}_scale", "pt_axis1"], "s"),
        n("Unsqueeze", [f"{b}_zf", "pt_axis1"], "z"),
    ]


def weight_initializers(q: np.ndarray, scale: np.ndarray, base: str) -> list[onnx.TensorProto]:
    """Wq [K, N] int8 (``base``), its scales ``base``_scale ([N] or one), zero points ``base``_zp and
    ``base``_colsum [N] = colsum(Wq) * sw, which the activations' zero point correction reads."""
    colsum = (q.astype(np.float64).sum(axis=0) * scale).astype(np.float32)
    scale = np.asarray(scale, np.float32)
    return [numpy_helper.from_array(q, base), numpy_helper.from_array(scale, f"{base}_scale"),
            numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{base}_zp"),
            numpy_helper.from_array(colsum, f"{base}_colsum")]


def linear_nodes(act: str, weight: str, n_out: int, out: str, name: str) -> tuple[list[onnx.NodeProto],
                                                                                  list[onnx.TensorProto]]:
    """Y = s * ((xq @ Wq) * sw - z * colsum(Wq) * sw), shaped back to x's shape with N last, written to ``out``.
    The integer GEMM is written as DequantizeLinear(xq, 1, 0) and DequantizeLinear(Wq, sw) into a MatMul: ONNX
    Runtime fuses that into ``MatMulIntegerToFloat`` (MLAS's u8s8 kernel) where it fuses QDQ, packages included,
    and edgeq's measurements, which do not fuse (edgeq/runtime.py), get the exact integer products in float, as
    an ARM CPU computes them, also on an x86 host whose u8s8 kernel saturates (AVX2 without VNNI)."""
    def n(op: str, inputs: list[str], o: str, **kw) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [o], name=f"{name}_{op}_{o.rsplit('_', 1)[-1]}", **kw)

    nodes = [
        n("DequantizeLinear", [f"{act}_q", "pt_one", "pt_zero_u8"], f"{name}_xcodes"),
        n("DequantizeLinear", [weight, f"{weight}_scale", f"{weight}_zp"], f"{name}_w", axis=1),
        n("MatMul", [f"{name}_xcodes", f"{name}_w"], f"{name}_acc"),
        n("Mul", [f"{act}_z", f"{weight}_colsum"], f"{name}_corr"),
        n("Sub", [f"{name}_acc", f"{name}_corr"], f"{name}_centred"),
        n("Mul", [f"{name}_centred", f"{act}_s"], f"{name}_rows"),
        n("Concat", [f"{act}_prefix", f"{name}_n"], f"{name}_outshape", axis=0),
        n("Reshape", [f"{name}_rows", f"{name}_outshape"], out),
    ]
    return nodes, [numpy_helper.from_array(np.array([n_out], np.int64), f"{name}_n")]
