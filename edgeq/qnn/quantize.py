"""QDQ for the QNN HTP backend: ONNX Runtime's ``get_qnn_qdq_config`` with 16-bit activations and 8-bit weights,
and 16-bit weights for the linear layers the plan promotes (edgeq/policy/qnn.py decides which).

Measured here: the SQNR of each linear layer's 8-bit per-tensor weight (a property of the weights alone: no model
runs), and each candidate plan's mean cosine on calibration text; the fewest promoted layers that bring it to
``sensitivity_target_mean_cosine`` are kept. MiniLM's numbers: see docs/decisions/qnn-htp.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgeq.categories import classify
from edgeq.metrics import EncoderAccuracy, compare
from edgeq.policy import PrecisionPlan
from edgeq.policy.qnn import decide_qnn_precision, promoted_weights, promotion_steps
from edgeq.profiles import QNNSpec
from edgeq.progress import QUIET, Progress
from edgeq.qnn.inputs import embed_static
from edgeq.runtime import session

@dataclass(frozen=True)
class QnnQuantized:
    onnx_path: Path
    plan: PrecisionPlan
    promoted: int
    calibration_accuracy: EncoderAccuracy  # of the chosen set, on calibration text


def weight_sqnr(model: onnx.ModelProto, bits: int = 8) -> dict[str, tuple[str, float]]:
    """Linear node -> (weight name, SQNR in dB of its weight quantized symmetric per tensor at ``bits``)."""
    inits = {i.name: i for i in model.graph.initializer}
    infos = classify(model)
    qmax = 2 ** (bits - 1) - 1
    out = {}
    for n in model.graph.node:
        if infos[n.name].category != "linear" or n.input[1] not in inits:
            continue
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
        scale = max(np.abs(w).max(), 1e-30) / qmax
        err = w - np.clip(np.round(w / scale), -qmax, qmax) * scale
        out[n.name] = (n.input[1], float(10 * np.log10((w ** 2).sum() / max((err ** 2).sum(), 1e-30))))
    return out


def _qtype(bits: int, signed: bool):
    from onnxruntime.quantization import QuantType

    return {(8, False): QuantType.QUInt8, (8, True): QuantType.QInt8,
            (16, False): QuantType.QUInt16, (16, True): QuantType.QInt16}[(bits, signed)]


class _Reader:
    def __init__(self, feeds) -> None:
        self.feeds = list(feeds)
        self.it = iter(self.feeds)

    def get_next(self):
        return next(self.it, None)

    def rewind(self) -> None:
        self.it = iter(self.feeds)


def write_qdq(static_path: Path, out: Path, cal_feeds, spec: QNNSpec, promoted_weights: list[str]) -> Path:
    from onnxruntime.quantization import quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    # symmetric signed 16-bit (zero point 0): measured to run on HTP v73/v75 (v68, the simulator default, refuses
    # FullyConnected with 16-bit weights)
    overrides = {w: [{"quant_type": _qtype(spec.sensitive_weight_bits, True), "symmetric": True}] for w in promoted_weights}
    root = logging.getLogger()
    level = root.level
    # expected notes: the opset-21 upgrade for 16-bit QDQ, "already overridden" for the 16-bit weights set above
    root.setLevel(logging.ERROR)
    try:
        config = get_qnn_qdq_config(str(static_path), _Reader(cal_feeds), activation_type=_qtype(spec.activation_bits, False),
                                    weight_type=_qtype(spec.weight_bits, False), init_overrides=overrides or None)
        quantize(str(static_path), str(out), config)
    finally:
        root.setLevel(level)
    return out


def quantize_for_htp(static_path: Path, tokenizer, cal_feeds, selection_texts, reference: np.ndarray, spec: QNNSpec,
                     pooling: str, mask_bias_changed: bool, workdir: Path, target: float,
                     progress: Progress = QUIET) -> QnnQuantized:
    model = onnx.load(str(static_path))
    sqnr = weight_sqnr(model, spec.weight_bits)
    n = len(sqnr)
    out = workdir / "qdq.onnx"
    for k in promotion_steps(n, spec):
        plan = decide_qnn_precision(model, sqnr, k, spec, mask_bias_changed)
        write_qdq(static_path, out, cal_feeds, spec, promoted_weights(plan, sqnr, spec))
        got = embed_static(session(out), tokenizer, selection_texts, spec.seq_len, spec.batch_size, pooling)
        acc = compare(reference, got)
        progress.stage("select", f"{k} of {n} linear layers with {spec.sensitive_weight_bits}-bit weights: "
                                 f"mean cosine {acc.mean_cosine:.5f}, min {acc.min_cosine:.5f} on calibration text")
        if acc.mean_cosine >= target:
            break
    return QnnQuantized(out, plan, k, acc)
