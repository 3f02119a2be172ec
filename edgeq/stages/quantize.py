"""quantize: measure per-layer sensitivity, let the policy decide, and write the QDQ model.

Sensitivity of a linear layer = mean-cosine drop of the pooled embeddings against FP32 when that layer alone is
static INT8 (measured on calibration text). The policy (edgeq/policy/encoder.py) then promotes the most sensitive
layers to the profile's ``sensitive_precision``: each candidate count from ``promotion_steps`` is planned, carried out
and measured here, and the first whose measurement ``selection_met`` is kept. The MiniLM probe behind this: see
docs/decisions/encoder-quantization.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from edgeq.metrics import EncoderAccuracy, compare
from edgeq.passes.base import run_passes
from edgeq.passes.keep_fp16 import KeepFp16
from edgeq.passes.quantize_linear import QuantizeLinearLayers
from edgeq.policy import PrecisionPlan, Sensitivity, decide_precision
from edgeq.policy.encoder import promotion_steps, selection_met
from edgeq.profiles import Profile
from edgeq.progress import QUIET, Progress
from edgeq.runtime import batches, embed_feeds, session
from edgeq.stages.calibrate import CalibrationStats
from edgeq.stages.optimize import OptimizedModel


@dataclass(frozen=True)
class QuantizedModel:
    optimized: OptimizedModel
    onnx_path: Path
    plan: PrecisionPlan
    sensitivity: Sensitivity
    promoted: int
    calibration_accuracy: EncoderAccuracy  # of the chosen plan, on calibration text (selection, not the gate)


def apply_plan(model: onnx.ModelProto, plan: PrecisionPlan, stats: CalibrationStats, profile: Profile) -> onnx.ModelProto:
    q = profile.quantization
    out, _ = run_passes(model, [
        QuantizeLinearLayers(plan, stats.ranges, q.activation_type, q.weight_per_channel),
        KeepFp16(plan),
    ])
    return out


def encode_texts(model: onnx.ModelProto, tokenizer, texts: tuple[str, ...], profile: Profile) -> list[dict[str, np.ndarray]]:
    """The token feeds of ``texts``, made once: every candidate model below is scored on the same feeds."""
    initializers = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in initializers]
    return list(batches(tokenizer, texts, profile.quantization.calibration_seq_len, names))


def _score(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], reference: np.ndarray,
           pooling: str) -> EncoderAccuracy:
    out = embed_feeds(session(model), feeds, pooling)
    return compare(reference[: len(out)], out)


def measure_sensitivity(optimized: OptimizedModel, model: onnx.ModelProto, stats: CalibrationStats, tokenizer,
                        texts: tuple[str, ...], profile: Profile, pooling: str, progress: Progress = QUIET) -> Sensitivity:
    texts = texts[: profile.quantization.sensitivity_samples]
    feeds = encode_texts(model, tokenizer, texts, profile)
    base = decide_precision(optimized.nodes, profile)
    linear = [d.name for d in base.of("int8")]
    drops = {}
    for i, name in enumerate(linear, 1):
        alone = PrecisionPlan(tuple(d if d.name == name else replace(d, precision="fp32") for d in base.decisions))
        acc = _score(apply_plan(model, alone, stats, profile), feeds, stats.reference, pooling)
        drops[name] = max(0.0, 1.0 - acc.mean_cosine)
        progress.step("sensitivity of linear layer", i, len(linear))
    return Sensitivity(drops, len(texts))


def quantize(optimized: OptimizedModel, stats: CalibrationStats, tokenizer, texts: tuple[str, ...], profile: Profile,
             pooling: str, workdir: Path, progress: Progress = QUIET) -> QuantizedModel:
    model = optimized.load()
    sens = measure_sensitivity(optimized, model, stats, tokenizer, texts, profile, pooling, progress)
    n = len(sens.drops)
    feeds = encode_texts(model, tokenizer, texts, profile)
    for k in promotion_steps(n):
        plan = decide_precision(optimized.nodes, profile, sens, promote=k)
        qmodel = apply_plan(model, plan, stats, profile)
        acc = _score(qmodel, feeds, stats.reference, pooling)
        progress.stage("select", f"{k} of {n} linear layers at {profile.quantization.sensitive_precision}: "
                                 f"mean cosine {acc.mean_cosine:.5f}, min {acc.min_cosine:.5f}, "
                                 f"retrieval top-1 {acc.retrieval_top1:.3f} on calibration text")
        if selection_met(acc, profile):
            break
    path = workdir / "quantized.onnx"
    onnx.save(qmodel, str(path))
    return QuantizedModel(optimized, path, plan, sens, k, acc)
