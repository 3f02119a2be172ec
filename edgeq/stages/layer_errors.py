"""layer_errors: each linear layer's output error at each precision, measured on sampled calibration tokens.

Why per layer and not end to end: the promotion ranking compares what promoting a layer buys (static int8 error
minus the promoted precision's error). Measured end to end on 64 calibration texts, that ranking followed the few
texts whose errors were largest and missed whole text types: MiniLM ranked by end-to-end gain promoted the FFN
inputs and one attention output, and held-back python-docs texts with RST underlines ("=====") fell to 0.9943
cosine, while the per-layer ranking over every sampled token puts each GELU output and attention context first
(docs/decisions/encoder-quantization.md). The relative squared error of a layer's output, sum |dY|^2 / sum |Y|^2
over the sampled tokens, with weights int8 per output channel as the pass quantizes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeq.passes.per_token import TokenQuant
from edgeq.passes.quantize_linear import ActivationRange
from edgeq.precision import Precision
from edgeq.stages.smooth import quantize_columns, quantize_rows


@dataclass(frozen=True)
class LayerErrors:
    static: float  # static int8 (smoothed, when the input is)
    per_token: float  # int8 per token (edgeq/passes/per_token.py)
    weight_only: float  # int8 weights, float activations

    def promoted(self, precision: str) -> float:
        """The error at a sensitive precision: FP32 none, 16-bit activations about the weights' alone."""
        if precision == Precision.INT8_PER_TOKEN:
            return self.per_token
        if precision in (Precision.INT8_WEIGHT_ONLY, Precision.W8A16):
            return self.weight_only
        if precision == Precision.FP32:
            return 0.0
        raise ValueError(f"no layer error for precision {precision!r}")


def per_token_rows(x: np.ndarray, tq: TokenQuant) -> np.ndarray:
    """x [M, K] fake quantized as edgeq/passes/per_token.py codes it (float64)."""
    hi = x.max(axis=1, keepdims=True)
    if tq.per_row:
        hi, lo = np.maximum(hi, 0), np.minimum(x.min(axis=1, keepdims=True), 0)
        s = np.maximum((hi - lo) / 255, 1e-12)
        z = np.round(-lo / s)
        return (np.clip(np.round(x / s) + z, 0, 255) - z) * s
    lo = x.min(axis=1, keepdims=True) if tq.floor is None else tq.floor
    s = np.maximum(np.maximum(hi / (255 - tq.z), -lo / tq.z), 1e-12)
    return (np.clip(np.round(x / s) + tq.z, 0, 255) - tq.z) * s


def measure(rows: np.ndarray, w: np.ndarray, static_range: ActivationRange, tq: TokenQuant,
            inv_scale: np.ndarray | None = None) -> LayerErrors:
    """``rows``: sampled input tokens [M, K]; ``w``: the layer's weight [K, N]; ``static_range``: the range of the
    static input (of X * inv_scale when smoothed)."""
    x = rows.astype(np.float64)
    w = w.astype(np.float64)
    y = x @ w
    norm = max(float(np.sum(y ** 2)), 1e-30)

    def err(out: np.ndarray) -> float:
        return float(np.sum((y - out) ** 2)) / norm

    wq = quantize_columns(w)
    if inv_scale is None:
        static = quantize_rows(x, static_range.lo, static_range.hi) @ wq
    else:
        t = 1 / inv_scale.astype(np.float64)
        static = quantize_rows(x / t, static_range.lo, static_range.hi) @ quantize_columns(w * t[:, None])
    return LayerErrors(err(static), err(per_token_rows(x, tq) @ wq), err(x @ wq))
