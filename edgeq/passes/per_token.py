"""Per-token int8 linear layers: int8 weights per output channel, uint8 activations quantized at run time with one
scale per token (row) and one zero point per activation, chosen at calibration.

Why per token: a static range per tensor is set by the rare outlier tokens of GELU outputs and attention contexts;
a per-token scale follows each token. The integer GEMM is MLAS's u8s8 kernel, several times faster on x86 than the
8-bit ``MatMulNBits`` of int8 weight-only layers (docs/decisions/encoder-quantization.md).

Why this form: at batch 1 a sentence's time is per-op overhead and passes over memory more than arithmetic, and ONNX
Runtime's integer GEMM takes one zero point for A. With a zero point Z fixed per activation the GEMM subtracts it
itself: the codes are one QuantizeLinear (per row of the reshaped [M, K] rows) and the output one Mul by the row
scales, where a zero point per row needs z * colsum and a Sub per layer and ten more small ops per activation (12
MiniLM layers: 1.05 against 1.17 ms per sentence). ``TokenQuant.fit`` chooses from the calibration tokens: Z where
it keeps each token's scale within 20% of its own zero point's (rms, relative); the calibrated floor in place of the
row minimum where every token's minimum is the same bound (GELU outputs: -0.17), which saves the ReduceMin; and a
zero point per row where no fixed Z comes near (LayerNorm outputs, whose outlier channels swing a token's range to
either side; then the old form, below, with its correction).

For a row x of X [..., K] and W [K, N] quantized as Wq * sw (symmetric, per column):
    s = max(max(x) / (255 - Z), -min(x) / Z, eps)    (min(x): the row's, or the floor)
    xq = saturate(round(x / s) + Z)                    (QuantizeLinear; exact in [0, 255] but for values below a floor)
    Y = s * ((xq - Z) @ Wq * sw)
and with a zero point per row: s = (max(x, 0) - min(x, 0)) / 255, z = round(-min(x, 0) / s),
    Y = s * ((xq @ Wq) * sw - z * colsum(Wq) * sw)
ONNX Runtime fuses the products into ``MatMulIntegerToFloat``; the rest is elementwise over [M, N] or [M, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

EPS = np.float32(1e-12)  # an all-zero row: scale 1e-12, codes Z, output 0
FLOOR_SLACK = 1.02  # a calibrated floor replaces the row minimum when it costs at most 2% more mean squared scale
PER_ROW_ABOVE = 1.2  # a zero point per row when a fixed one's scales are 20% larger (rms over tokens, relative to
                     # each token's own) than a zero point per row gives


@dataclass(frozen=True)
class TokenQuant:
    """One activation's per-token quantization: zero point ``z`` and, when every token's minimum is about the same,
    the ``floor`` (<= 0) used instead of the row minimum; or, ``per_row``, a zero point per row (where no fixed one
    comes near: LayerNorm outputs, whose outlier channels swing each token's range to either side)."""
    z: int = 128
    floor: float | None = None
    per_row: bool = False

    @classmethod
    def fit(cls, lo: np.ndarray, hi: np.ndarray) -> "TokenQuant":
        """From the calibration tokens' row minima ``lo`` and maxima ``hi``. Costs are each token's squared scale
        relative to a zero point of its own, (max - min) / 255, averaged: a token with small values is coded as
        finely, relatively, as one with large values (an absolute cost lets the large ones choose for all)."""
        lo = np.minimum(np.asarray(lo, np.float64), 0)
        hi = np.maximum(np.asarray(hi, np.float64), 0)
        if not lo.size:
            return cls()
        own = np.maximum((hi - lo) / 255, 1e-30)
        z_row, cost_row = _best_z(lo, hi, own)
        if cost_row > PER_ROW_ABOVE ** 2:
            return cls(per_row=True)
        floor = float(lo.min())
        z_floor, cost_floor = _best_z(np.full_like(lo, floor), hi, own)
        if cost_floor <= FLOOR_SLACK * cost_row:
            return cls(z_floor, floor)
        return cls(z_row)

    def describe(self) -> str:
        """As the manifest records it."""
        if self.per_row:
            return "zero point per token"
        floor = f", floor {self.floor:.6g} for the token minimum" if self.floor is not None else ""
        return f"zero point {self.z}{floor}"


def _best_z(lo: np.ndarray, hi: np.ndarray, own: np.ndarray) -> tuple[int, float]:
    z = np.arange(1, 255, dtype=np.float64)[:, None]
    cost = ((np.maximum(hi[None, :] / (255 - z), -lo[None, :] / z) / own[None, :]) ** 2).mean(axis=1)
    i = int(np.argmin(cost))
    return i + 1, float(cost[i])


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
            numpy_helper.from_array(EPS, "pt_eps"),
            numpy_helper.from_array(np.float32(0), "pt_zero"),
            numpy_helper.from_array(np.float32(1 / 255), "pt_inv255"),
            numpy_helper.from_array(np.float32(1), "pt_one"),
            *(numpy_helper.from_array(np.array([-1, k], np.int64), f"pt_rows_{k}") for k in sorted(ks))]


def activation_nodes(x: str, k: int, tq: TokenQuant, base: str, opset: int) -> tuple[list[onnx.NodeProto],
                                                                                     list[onnx.TensorProto]]:
    """Quantize ``x`` [..., K] per row: ``base``_q uint8 [M, K], ``base``_s float [M, 1] (the row scales),
    ``base``_z (uint8 Z, for the layers' DequantizeLinear) and ``base``_prefix (x's shape without K)."""
    z = tq.z
    if not 1 <= z <= 254:
        raise ValueError(f"per-token zero point {z} outside [1, 254]")
    b = base

    def n(op: str, inputs: list[str], out: str, **kw) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [f"{b}_{out}"], name=f"{b}_{out}_{op}", **kw)

    nodes = [
        n("Shape", [x], "shape"),
        n("Slice", [f"{b}_shape", "pt_zero_i", "pt_minus1"], "prefix"),
        n("Reshape", [x, f"pt_rows_{k}"], "rows"),
    ]
    if tq.per_row:  # s = (max(x, 0) - min(x, 0)) / 255, z = round(-min(x, 0) / s) per row
        nodes += [
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
            n("Cast", [f"{b}_zf"], "zs", to=TensorProto.UINT8),
            n("QuantizeLinear", [f"{b}_rows", f"{b}_scale", f"{b}_zs"], "q", axis=0),
            n("Unsqueeze", [f"{b}_scale", "pt_axis1"], "s"),
            n("Unsqueeze", [f"{b}_zf", "pt_axis1"], "zrow"),
        ]
        return nodes, [numpy_helper.from_array(np.uint8(0), f"{b}_z")]
    nodes += [
        _reduce("ReduceMax", f"{b}_rows", f"{b}_hi", f"{b}_hi_ReduceMax", opset),
        n("Mul", [f"{b}_hi", f"{b}_hi_k"], "sh"),  # max(x) / (255 - Z)
    ]
    consts = [numpy_helper.from_array(np.float32(1 / (255 - z)), f"{b}_hi_k"),
              numpy_helper.from_array(np.uint8(z), f"{b}_z")]
    if tq.floor is None:
        nodes += [_reduce("ReduceMin", f"{b}_rows", f"{b}_lo", f"{b}_lo_ReduceMin", opset),
                  n("Mul", [f"{b}_lo", f"{b}_lo_k"], "sl"),  # -min(x) / Z
                  n("Max", [f"{b}_sh", f"{b}_sl", "pt_eps"], "scale")]
        consts.append(numpy_helper.from_array(np.float32(-1 / z), f"{b}_lo_k"))
    else:
        nodes.append(n("Max", [f"{b}_sh", f"{b}_least"], "scale"))
        consts.append(numpy_helper.from_array(np.maximum(np.float32(-tq.floor / z), EPS), f"{b}_least"))
    nodes += [
        n("Shape", [f"{b}_scale"], "m"),
        n("Expand", [f"{b}_z", f"{b}_m"], "zs"),  # QuantizeLinear wants a zero point per scale
        n("QuantizeLinear", [f"{b}_rows", f"{b}_scale", f"{b}_zs"], "q", axis=0),
        n("Unsqueeze", [f"{b}_scale", "pt_axis1"], "s"),
    ]
    return nodes, consts


def weight_initializers(q: np.ndarray, scale: np.ndarray, base: str) -> list[onnx.TensorProto]:
    """Wq [K, N] int8 (``base``), its scales ``base``_scale ([N] or one), zero points ``base``_zp and
    ``base``_colsum [N] = colsum(Wq) * sw (for an input with a zero point per row)."""
    colsum = (q.astype(np.float64).sum(axis=0) * scale).astype(np.float32)
    scale = np.asarray(scale, np.float32)
    return [numpy_helper.from_array(q, base), numpy_helper.from_array(scale, f"{base}_scale"),
            numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{base}_zp"),
            numpy_helper.from_array(colsum, f"{base}_colsum")]


def linear_nodes(act: str, weight: str, n_out: int, out: str, name: str, per_row: bool = False
                 ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Y = s * ((xq - Z) @ Wq * sw), shaped back to x's shape with N last, written to ``out``. The integer GEMM is
    written as DequantizeLinear(xq, 1, Z) and DequantizeLinear(Wq, sw) into a MatMul: ONNX Runtime fuses that into
    ``MatMulIntegerToFloat`` (MLAS's u8s8 kernel) where it fuses QDQ, packages included, and edgeq's measurements,
    which do not fuse (edgeq/runtime.py), get the exact integer products in float, as an ARM CPU computes them, also
    on an x86 host whose u8s8 kernel saturates (AVX2 without VNNI)."""
    def n(op: str, inputs: list[str], o: str, **kw) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [o], name=f"{name}_{op}_{o.rsplit('_', 1)[-1]}", **kw)

    nodes = [
        n("DequantizeLinear", [f"{act}_q", "pt_one", f"{act}_z"], f"{name}_xcodes"),
        n("DequantizeLinear", [weight, f"{weight}_scale", f"{weight}_zp"], f"{name}_w", axis=1),
        n("MatMul", [f"{name}_xcodes", f"{name}_w"], f"{name}_acc"),
    ]
    acc = f"{name}_acc"
    if per_row:  # the GEMM ran with zero point 0: subtract z * colsum(Wq) * sw per row
        nodes += [n("Mul", [f"{act}_zrow", f"{weight}_colsum"], f"{name}_corr"),
                  n("Sub", [acc, f"{name}_corr"], f"{name}_centred")]
        acc = f"{name}_centred"
    nodes += [
        n("Mul", [acc, f"{act}_s"], f"{name}_rows"),
        n("Concat", [f"{act}_prefix", f"{name}_n"], f"{name}_outshape", axis=0),
        n("Reshape", [f"{name}_rows", f"{name}_outshape"], out),
    ]
    return nodes, [numpy_helper.from_array(np.array([n_out], np.int64), f"{name}_n")]
