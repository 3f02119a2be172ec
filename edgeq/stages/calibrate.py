"""calibrate: run the FP32 model over calibration text and record the range of every linear layer's input.

Padding positions are left out of the ranges (they are masked out downstream, and their values would widen the
range for nothing). 'percentile' keeps the k largest and smallest values seen so far per tensor, which is exact for
the tail percentiles used here (99.999% of ~8M values is the 78th largest) at bounded memory.
"""

from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgeq.passes.quantize_linear import ActivationRange
from edgeq.profiles import QuantizationSpec
from edgeq.progress import QUIET, Progress
from edgeq.runtime import BATCH, batches, pool, session
from edgeq.stages.optimize import OptimizedModel

TAIL_KEEP = 4096  # extreme values kept per tensor and side; bounds memory, exact while k <= TAIL_KEEP


@dataclass(frozen=True)
class CalibrationStats:
    ranges: dict[str, ActivationRange]
    samples: int
    method: str
    reference: np.ndarray  # FP32 pooled embeddings of the calibration texts, reused by sensitivity measurement


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
    names = [i.name for i in sess.get_inputs()]
    outputs = [o.name for o in sess.get_outputs()]
    tails = {t: _Tails() for t in tensors}
    pooled = []
    n_batches = math.ceil(len(texts) / BATCH)
    for b, feeds in enumerate(batches(tokenizer, texts, spec.calibration_seq_len, names), 1):
        values = dict(zip(outputs, sess.run(None, feeds)))
        mask = feeds["attention_mask"].astype(bool)
        pooled.append(pool(values[outputs[0]], feeds["attention_mask"], pooling))
        for t in tensors:
            v = values[t]
            real = v[mask] if v.shape[:2] == mask.shape else v  # [B, S, H] -> real tokens only
            tails[t].add(real.reshape(-1).astype(np.float32))
        progress.step("calibration batch", b, n_batches)
    ranges = {t: tails[t].range(spec.calibration_method, spec.calibration_percentile) for t in tensors}
    return CalibrationStats(ranges, len(texts), spec.calibration_method, np.concatenate(pooled))
