"""calibrate: run the FP32 model over calibration text and record the range of every linear layer's input.

Padding positions are left out of the ranges (they are masked out downstream, and their values would widen the
range for nothing). Also kept per input: each token's minimum and maximum (the per-token zero points,
edgeq/passes/per_token.py) and ~512 tokens sampled evenly from the first ``sensitivity_samples`` texts, on which
each linear layer's output error at each precision is measured (the promotion ranking, edgeq/stages/layer_errors.py).
With ``smoothing`` on, each input's largest |value| per channel too: its smoothing is chosen from them
(edgeq/stages/smooth.py), and a second pass over the same token batches takes the smoothed inputs' ranges.
'percentile' keeps the k largest and smallest values seen so far per tensor, which is exact for the tail
percentiles used here (99.999% of ~8M values is the 78th largest) at bounded memory."""

from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeq.passes.per_token import TokenQuant
from edgeq.passes.quantize_linear import ActivationRange
from edgeq.profiles import QuantizationSpec
from edgeq.progress import QUIET, Progress
from edgeq.runtime import batches, pool, session
from edgeq.stages.layer_errors import LayerErrors, measure
from edgeq.stages.optimize import OptimizedModel
from edgeq.stages.smooth import Smoothing, choose, weight_as_k_by_n

TAIL_KEEP = 4096  # extreme values kept per tensor and side; bounds memory, exact while k <= TAIL_KEEP
SAMPLE_ROWS = 512  # tokens per input sampled (evenly, at most about this many): smoothing and per-layer errors


@dataclass(frozen=True)
class CalibrationStats:
    ranges: dict[str, ActivationRange]
    samples: int
    method: str
    reference: np.ndarray  # FP32 pooled embeddings of the calibration texts, reused by sensitivity measurement
    smoothing: dict[str, Smoothing] = field(default_factory=dict)  # smoothed inputs (profile's smoothing on)
    smoothed_ranges: dict[str, ActivationRange] = field(default_factory=dict)  # their ranges, of X * inv_scale
    token_quant: dict[str, TokenQuant] = field(default_factory=dict)  # each input's per-token zero point and floor
    layer_errors: dict[str, LayerErrors] = field(default_factory=dict)  # each linear node's, by name


class _Tails:
    def __init__(self) -> None:
        self.top = np.empty(0, np.float32)
        self.bottom = np.empty(0, np.float32)
        self.count = 0

    def add(self, v: np.ndarray) -> None:
        self.count += v.size
        k = min(TAIL_KEEP, v.size)
        self.top = np.sort(np.concatenate([self.top, np.partition(v, v.size - k)[v.size - k:]]))[-TAIL_KEEP:]
        self.bottom = np.sort(np.concatenate([self.bottom, np.partition(v, k - 1)[:k]]))[:TAIL_KEEP]

    def range(self, method: str, percentile: float) -> ActivationRange:
        if method == "minmax":
            return ActivationRange(float(self.bottom[0]), float(self.top[-1]))
        # Exact rational arithmetic: in binary floating point 1 - 99.999/100 exceeds 1e-5 and k comes out one too big.
        k = max(1, math.ceil(self.count * (100 - Fraction(str(percentile))) / 100))
        k = min(k, len(self.top))
        return ActivationRange(float(self.bottom[k - 1]), float(self.top[-k]))


def linear_inputs(optimized: OptimizedModel, model: onnx.ModelProto) -> list[str]:
    names = {n for n, info in optimized.nodes.items() if info.category == "linear"}
    return sorted({n.input[0] for n in model.graph.node if n.name in names})


def calibrate(optimized: OptimizedModel, tokenizer, texts: tuple[str, ...], spec: QuantizationSpec,
              pooling: str, progress: Progress = QUIET) -> CalibrationStats:
    model = optimized.load()
    tensors = linear_inputs(optimized, model)
    known = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in known:
            model.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    sess = session(model)
    tails = {t: _Tails() for t in tensors}
    absmax: dict[str, np.ndarray] = {}
    samples: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    seen = {t: 0 for t in tensors}
    extremes: dict[str, list[np.ndarray]] = {t: [] for t in tensors}  # [2, tokens]: each token's min and max
    pooled = []
    feeds_list = list(batches(tokenizer, texts, spec.calibration_seq_len, [i.name for i in sess.get_inputs()]))
    # tokens of the first sensitivity_samples texts, sampled evenly: at most about SAMPLE_ROWS per input
    sampled = [int(f["attention_mask"][: max(0, spec.sensitivity_samples - b * len(feeds_list[0]["attention_mask"]))]
                   .sum()) for b, f in enumerate(feeds_list)]
    stride = max(1, math.ceil(sum(sampled) / SAMPLE_ROWS))
    runs = _runs(sess, feeds_list, tensors, progress, "calibration batch")
    for (values, mask, rows), n_sampled in zip(runs, sampled):
        pooled.append(pool(values[sess.get_outputs()[0].name], mask.astype(np.int64), pooling))
        for t, r in rows.items():
            tails[t].add(r.reshape(-1).astype(np.float32))
            extremes[t].append(np.stack([r.min(axis=1), r.max(axis=1)]))
            r_s = r[:n_sampled] if len(r) == mask.sum() else r  # [B, S, H]: rows in text order, sampled texts first
            samples[t].append(r_s[(np.arange(len(r_s)) + seen[t]) % stride == 0])
            seen[t] += len(r_s)
            if spec.smoothing:
                m = np.abs(r).max(axis=0)
                absmax[t] = np.maximum(absmax[t], m) if t in absmax else m
    ranges = {t: tails[t].range(spec.calibration_method, spec.calibration_percentile) for t in tensors}
    linear = _linear_weights(optimized, model)  # read once: the smoothing choice and the layer errors use them
    smoothing = _choose_smoothing(linear, samples, absmax, spec) if spec.smoothing else {}
    smoothed_ranges = {}
    if smoothing:
        tails = {t: _Tails() for t in smoothing}
        for _, _, rows in _runs(sess, feeds_list, list(smoothing), progress, "smoothed ranges batch"):
            for t, r in rows.items():
                tails[t].add((r * smoothing[t].inv_scale).reshape(-1).astype(np.float32))
        smoothed_ranges = {t: tails[t].range(spec.calibration_method, spec.calibration_percentile) for t in smoothing}
    token_quant = {t: TokenQuant.fit(*np.concatenate(extremes[t], axis=1)) for t in tensors}
    errors = {}
    for name, x, w in linear:
        if x in samples and samples[x]:
            smooth = smoothing.get(x)
            errors[name] = measure(np.concatenate(samples[x]), w, smoothed_ranges[x] if smooth else ranges[x],
                                   token_quant[x], smooth.inv_scale if smooth else None)
    return CalibrationStats(ranges, len(texts), spec.calibration_method, np.concatenate(pooled), smoothing,
                            smoothed_ranges, token_quant, errors)


def _runs(sess, feeds_list: list[dict[str, np.ndarray]], tensors: list[str], progress: Progress, step: str):
    """Per batch: the session's outputs by name, the attention mask and each tensor's real-token rows [tokens, H]."""
    outputs = [o.name for o in sess.get_outputs()]
    for b, feeds in enumerate(feeds_list, 1):
        values = dict(zip(outputs, sess.run(None, feeds)))
        mask = feeds["attention_mask"].astype(bool)
        rows = {}
        for t in tensors:
            v = values[t]
            real = v[mask] if v.shape[:2] == mask.shape else v  # [B, S, H] -> real tokens only
            rows[t] = real.reshape(-1, real.shape[-1])
        yield values, mask, rows
        progress.step(step, b, len(feeds_list))


def _linear_weights(optimized: OptimizedModel, model: onnx.ModelProto) -> list[tuple[str, str, np.ndarray]]:
    """(node name, input, weight as [K, N]) of every linear node with a constant weight."""
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        info = optimized.nodes.get(n.name)
        w = weight_as_k_by_n(n, inits) if info is not None and info.category == "linear" else None
        if w is not None:
            out.append((n.name, n.input[0], w))
    return out


def _choose_smoothing(linear: list[tuple[str, str, np.ndarray]], samples: dict[str, list[np.ndarray]],
                      absmax: dict[str, np.ndarray], spec: QuantizationSpec) -> dict[str, Smoothing]:
    readers: dict[str, list[np.ndarray]] = {}
    for _, x, w in linear:
        readers.setdefault(x, []).append(w.astype(np.float64))
    percentile = spec.calibration_percentile if spec.calibration_method == "percentile" else 100.0
    chosen = {}
    for t, rows in samples.items():
        if t in readers and rows:
            s = choose(np.concatenate(rows), absmax[t], readers[t], percentile)
            if s is not None:
                chosen[t] = s
    return chosen
