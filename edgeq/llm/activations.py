"""Input statistics of a linear layer, for data-aware weight quantization (GPTQ, clip search, sensitivities).

edgeq/decoder/layerwise.py runs one decoder layer at a time over the calibration windows and, for each distinct input
X of its linear layers (q/k/v read one tensor; so do gate/up), accumulates one window at a time:

  * ``xtx = sum X^T X`` ([K, K]): GPTQ's Hessian up to a factor 2/rows that its relative dampening ignores;
  * ``abs_sum = sum |x|`` per input channel (float64 [K]): the AWQ-style activation magnitude.

Memory is bounded by the layer widths, not by the amount of text; sizes, time and peak memory: see
docs/decisions/int4.md and docs/decisions/streamed-decoder.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Inputs up to this width keep float64 Hessians, traces and GPTQ's inverse Cholesky (what SmolLM2's +6% budget was
# met with; float32 throughout moved its perplexity from +5.85% to +6.1%); wider ones (a 1B model's down_proj,
# K = 8192, and up) use float32, which halves their memory and time
FLOAT64_MAX_K = 4096


@dataclass
class InputStats:
    k: int
    xtx: np.ndarray = field(repr=False)
    abs_sum: np.ndarray = field(repr=False)
    rows: int = 0

    @classmethod
    def empty(cls, k: int) -> "InputStats":
        return cls(k, np.zeros((k, k), np.float64 if k <= FLOAT64_MAX_K else np.float32), np.zeros(k, np.float64))

    def add(self, x: np.ndarray) -> None:
        # float32 above FLOAT64_MAX_K (sgemm): a 1B model's down_proj Hessian took 16 s per layer in float64, and
        # its 8192 x 8192 accumulator 512 MB; each entry sums a few thousand rows, far from float32's limits
        x = np.ascontiguousarray(x.reshape(-1, self.k), dtype=self.xtx.dtype)
        self.xtx += x.T @ x
        self.abs_sum += np.abs(x).sum(axis=0, dtype=np.float64)
        self.rows += x.shape[0]

    @property
    def hessian(self) -> np.ndarray:
        return self.xtx

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.rows, 1)
