"""smooth: per-channel activation smoothing for static int8 linear layers (SmoothQuant, Xiao et al. 2023).

Why: in MiniLM the extreme values of LayerNorm and GELU outputs sit in a few channels (dropping the 2-8 largest
channels of an attention-output LayerNorm takes its range from 28.5 to 7.4-3.8), and one static range per tensor is
set by them: every other channel is coded on a few steps. Dividing input channel k by t_k and multiplying row k of
the weight by t_k leaves X @ W unchanged and moves part of that range into the weights, which are quantized per
output channel and have range to spare. t_k = max|X_k| ** alpha / max|W_k| ** (1 - alpha), alpha chosen per input
among ``ALPHAS`` (or none) by the error of the layers' outputs on sampled calibration tokens, since what suits an
attention input does not suit a GELU output (measured per layer: docs/decisions/encoder-quantization.md).

At run time it costs one Mul by 1/t per smoothed input (shared by the layers that read it) in front of the static
QuantizeLinear, which stays one per-tensor op: a per-channel QuantizeLinear along the last axis runs one MLAS call
per element in ONNX Runtime 1.32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from edgeq.passes.quantize_linear import ActivationRange, activation_qparams, quantize_weight

ALPHAS = (0.5, 0.75, 0.9, 0.95, 1.0)  # beside none; chosen per input by measured output error (MiniLM: 0.75-1)


@dataclass(frozen=True)
class Smoothing:
    """An input's smoothing: X is read as X * inv_scale (1/t per channel, float32 [K])."""
    inv_scale: np.ndarray
    alpha: float
    error: float  # the consumers' relative output error on the sampled tokens, with it
    error_unsmoothed: float


def quantize_rows(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """uint8 static fake quantization over [lo, hi], with the scale and zero point the pass writes
    (``activation_qparams``), as QuantizeLinear/DequantizeLinear compute it."""
    scale, zp = activation_qparams(ActivationRange(lo, hi), "uint8")
    s, z = float(scale), float(zp)
    return (np.clip(np.round(x / s) + z, 0, 255) - z) * s


def quantize_columns(w: np.ndarray) -> np.ndarray:
    """W [K, N] int8 per output channel as the pass quantizes it (``quantize_weight``), dequantized."""
    q, scale = quantize_weight(w, 1, per_channel=True)
    return q.astype(np.float64) * scale.astype(np.float64)


def _tail_range(x: np.ndarray, percentile: float) -> tuple[float, float]:
    k = max(1, int(np.ceil(x.size * (100 - percentile) / 100)))
    flat = x.reshape(-1)
    return float(np.partition(flat, k - 1)[k - 1]), float(-np.partition(-flat, k - 1)[k - 1])


def _error(rows: np.ndarray, weights: list[np.ndarray], t: np.ndarray, percentile: float) -> float:
    """The readers' mean relative squared output error, each half of the tokens coded with the range the other half
    sets: a smoothing that fits the calibration extremes of every channel exactly (alpha 1 divides each channel by its
    own maximum) leaves no headroom for a token calibration did not see, and only held-out tokens show that."""
    xs = rows / t
    halves = (xs[0::2], xs[1::2]), (xs[1::2], xs[0::2])
    total = 0.0
    for w in weights:
        wq = quantize_columns(w * t[:, None])
        for fit, held in halves:
            y = held @ (w * t[:, None])
            total += float(np.sum((y - quantize_rows(held, *_tail_range(fit, percentile)) @ wq) ** 2)
                           / max(np.sum(y ** 2), 1e-30))
    return total / (2 * len(weights))


def choose(rows: np.ndarray, absmax: np.ndarray, weights: list[np.ndarray], percentile: float) -> Smoothing | None:
    """The smoothing of one input (``rows``: sampled calibration tokens [M, K]; ``absmax``: max |x| per channel over
    all of calibration; ``weights``: each reader's W as [K, N]), or None when no alpha beats none."""
    rows = rows.astype(np.float64)
    wmax = np.maximum(np.max([np.abs(w).max(axis=1) for w in weights], axis=0), 1e-12)
    amax = np.maximum(absmax.astype(np.float64), 1e-12)
    none = _error(rows, weights, np.ones(rows.shape[1]), percentile)
    best: Smoothing | None = None
    for alpha in ALPHAS:
        t = amax ** alpha / wmax ** (1 - alpha)
        t = t / np.exp(np.mean(np.log(t)))  # scale-free; keeps the weights' magnitude
        e = _error(rows, weights, t, percentile)
        if e < none and (best is None or e < best.error):
            best = Smoothing((1 / t).astype(np.float32), alpha, e, none)
    return best


def weight_as_k_by_n(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """A linear node's constant weight as [K, N] (a Gemm with transB transposed back), None if it has none."""
    if len(node.input) < 2 or node.input[1] not in inits:
        return None
    w = numpy_helper.to_array(inits[node.input[1]])
    if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
        return w.T
    return w
