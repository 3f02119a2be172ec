"""Per-token int8 linear layers: int8 weights per output channel, uint8 activations quantized at run time with one
scale per token (row) and one zero point per activation, chosen at calibration.

Why per token: a static range per tensor is set by the rare outlier tokens of GELU outputs and attention contexts;
a per-token scale follows each token. The integer GEMM is MLAS's u8s8 kernel, several times faster on x86 than the
8-bit ``MatMulNBits`` of int8 weight-only layers (docs/decisions/encoder-quantization.md).

Why this form: at batch 1 a sentence's time is per-op overhead and passes over memory more than arithmetic, and ONNX
Runtime's integer GEMM takes one zero point for A. With a zero point Z fixed per activation the GEMM subtracts it
itself: the codes are x divided by its row scales and one per-tensor QuantizeLinear (scale 1, zero point Z), the
output one Mul by the row scales, all on x's own shape (no reshape to rows), where a zero point per row needs
z * colsum and a Sub per layer and more small ops per activation (12 MiniLM layers: 1.05 against 1.17 ms per
sentence). ``TokenQuant.fit`` chooses from the calibration tokens: Z where
it keeps each token's scale within 20% of its own zero point's (rms, relative); the calibrated floor in place of the
row minimum where every token's minimum is the same bound (GELU outputs: -0.17), which saves the ReduceMin; and a
zero point per row where no fixed Z comes near (LayerNorm outputs, whose outlier channels swing a token's range to
either side; then the old form, below, with its correction).

For a row x of X [..., K] and W [K, N] quantized as Wq * sw (symmetric, per column):
    s = max(max(x) / (255 - Z), -min(x) / Z, eps)    (min(x): the row's, or the floor)
    xq = saturate(round(x / s) + Z)                    (QuantizeLinear(x / s, 1, Z); exact but below a floor)
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
    """Over the last axis, kept: [..., K] -> [..., 1], which broadcasts against x and the layer's [..., N]."""
    if opset >= 18:  # axes became an input in opset 18
        return helper.make_node(op, [x, "pt_last"], [out], name=name, keepdims=1)
    return helper.make_node(op, [x], [out], name=name, axes=[-1], keepdims=1)


def constants() -> list[onnx.TensorProto]:
    """The constants every per-token activation shares (added once per model)."""
    return [numpy_helper.from_array(np.array([-1], np.int64), "pt_last"),
            numpy_helper.from_array(EPS, "pt_eps"),
            numpy_helper.from_array(np.float32(0), "pt_zero"),
            numpy_helper.from_array(np.float32(1 / 255), "pt_inv255"),
            numpy_helper.from_array(np.float32(1), "pt_one"),
            numpy_helper.from_array(np.uint8(0), "pt_zero_u8")]


def activation_nodes(x: str, tq: TokenQuant, base: str, opset: int) -> tuple[list[onnx.NodeProto],
                                                                            list[onnx.TensorProto]]:
    """Quantize ``x`` [..., K] per row: ``base``_q uint8 [..., K], ``base``_s float [..., 1] (the row scales, times
    ``1 / output_factor(tq)``) and ``base``_z (uint8 Z, for the layers' DequantizeLinear; with a zero point per
    row, 0 and ``base``_zrow [..., 1]). The codes are a per-tensor QuantizeLinear of x divided by its row scales:
    it rounds, adds Z and saturates in one op, where QuantizeLinear(x, s, Z) would want x as [M, K] rows and s as
    [M] (a Shape, Slice, Reshape, Expand and Unsqueeze per activation and a Concat and Reshape per layer: 12 more
    nodes a MiniLM layer pair, ~2 us each at batch 1). A per-axis QuantizeLinear over K would carry smoothing's
    1 / t instead of a Mul, but ONNX Runtime's CPU kernel runs it 48x slower than Mul and QuantizeLinear."""
    z = tq.z
    if not 1 <= z <= 254:
        raise ValueError(f"per-token zero point {z} outside [1, 254]")
    b = base

    def n(op: str, inputs: list[str], out: str, **kw) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [f"{b}_{out}"], name=f"{b}_{out}_{op}", **kw)

    if tq.per_row:  # s = (max(x, 0) - min(x, 0)) / 255, z = round(-min(x, 0) / s) per row
        nodes = [
            _reduce("ReduceMax", x, f"{b}_hi0", f"{b}_hi0_ReduceMax", opset),
            _reduce("ReduceMin", x, f"{b}_lo0", f"{b}_lo0_ReduceMin", opset),
            n("Max", [f"{b}_hi0", "pt_zero"], "hi"),  # zero in every range: its code is exact
            n("Min", [f"{b}_lo0", "pt_zero"], "lo"),
            n("Sub", [f"{b}_hi", f"{b}_lo"], "range"),
            n("Mul", [f"{b}_range", "pt_inv255"], "s0"),
            n("Max", [f"{b}_s0", "pt_eps"], "s"),
            n("Div", [f"{b}_lo", f"{b}_s"], "lodiv"),
            n("Neg", [f"{b}_lodiv"], "zneg"),
            n("Round", [f"{b}_zneg"], "zrow"),  # in [0, 255]: lo <= 0 and scale >= -lo / 255
            n("Div", [x, f"{b}_s"], "scaled"),
            n("Add", [f"{b}_scaled", f"{b}_zrow"], "shifted"),  # z is whole: round(x / s + z) = round(x / s) + z
            n("QuantizeLinear", [f"{b}_shifted", "pt_one", "pt_zero_u8"], "q"),
        ]
        return nodes, [numpy_helper.from_array(np.uint8(0), f"{b}_z")]
    # s' = (255 - Z) * s: the codes are QuantizeLinear(x / s', 1 / (255 - Z), Z) and the layers' weight scales
    # carry the 1 / (255 - Z) (output_factor), so s' alone multiplies the output: one Mul fewer per activation
    m = np.float32(255 - z)
    nodes = [_reduce("ReduceMax", x, f"{b}_hi", f"{b}_hi_ReduceMax", opset)]
    consts = [numpy_helper.from_array(np.float32(1 / m), f"{b}_c"), numpy_helper.from_array(np.uint8(z), f"{b}_z")]
    if tq.floor is None:
        nodes += [_reduce("ReduceMin", x, f"{b}_lo", f"{b}_lo_ReduceMin", opset),
                  n("Mul", [f"{b}_lo", f"{b}_lo_k"], "sl"),  # -min(x) (255 - Z) / Z
                  n("Max", [f"{b}_hi", f"{b}_sl", f"{b}_eps"], "s")]
        consts += [numpy_helper.from_array(np.float32(-m / z), f"{b}_lo_k"),
                   numpy_helper.from_array(EPS * m, f"{b}_eps")]
    else:
        nodes.append(n("Max", [f"{b}_hi", f"{b}_least"], "s"))
        consts.append(numpy_helper.from_array(np.maximum(np.float32(-tq.floor * m / z), EPS * m), f"{b}_least"))
    nodes += [
        n("Div", [x, f"{b}_s"], "scaled"),
        n("QuantizeLinear", [f"{b}_scaled", f"{b}_c", f"{b}_z"], "q"),
    ]
    return nodes, consts


def output_factor(tq: TokenQuant) -> float:
    """What the layers reading a ``tq`` activation multiply their weight scales by: 1 / (255 - Z) for a fixed zero
    point (``activation_nodes`` leaves it out of the row scales), 1 with a zero point per row."""
    return 1.0 if tq.per_row else 1.0 / (255 - tq.z)


def weight_initializers(q: np.ndarray, scale: np.ndarray, base: str) -> list[onnx.TensorProto]:
    """Wq [K, N] int8 (``base``), its scales ``base``_scale ([N] or one), zero points ``base``_zp and
    ``base``_colsum [N] = colsum(Wq) * sw (for an input with a zero point per row)."""
    colsum = (q.astype(np.float64).sum(axis=0) * scale).astype(np.float32)
    scale = np.asarray(scale, np.float32)
    return [numpy_helper.from_array(q, base), numpy_helper.from_array(scale, f"{base}_scale"),
            numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{base}_zp"),
            numpy_helper.from_array(colsum, f"{base}_colsum")]


def linear_nodes(act: str, weight: str, out: str, name: str, per_row: bool = False) -> list[onnx.NodeProto]:
    """Y = s * ((xq - Z) @ Wq * sw) [..., N], written to ``out``. The integer GEMM is
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
    nodes.append(helper.make_node("Mul", [acc, f"{act}_s"], [out], name=f"{name}_Mul_rows"))
    return nodes
