"""quantize: measure per-layer sensitivity, let the policy decide, and write the QDQ model.

Sensitivity of a linear layer = what promoting it gains: its output error at static INT8 (smoothed where the input
is) minus at the profile's ``sensitive_precision``, measured per layer on sampled calibration tokens at calibration
(edgeq/stages/layer_errors.py says why per layer). The policy (edgeq/policy/encoder.py) then promotes the most sensitive
layers to the profile's ``sensitive_precision``: ``Candidates`` plans, carries out and scores each count that
``promotion_count`` asks for, which keeps the first that meets every target (mean and min cosine, retrieval top-1).
The same candidates serve the search for the closest passing setting after a failed gate (edgeq/stages/remedy.py).
The MiniLM probe behind this: see docs/decisions/encoder-quantization.md."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from edgeq.metrics import EncoderAccuracy, compare
from edgeq.passes.base import run_passes
from edgeq.passes.keep_fp16 import KeepFp16
from edgeq.passes.quantize_linear import QuantizeLinearLayers
from edgeq.policy import PrecisionPlan, SelectionStep, Sensitivity, decide_precision, promotion_count
from edgeq.profiles import Profile
from edgeq.progress import QUIET, Progress
from edgeq.runtime import batches, embed_feeds, session
from edgeq.stages.calibrate import CalibrationStats
from edgeq.stages.optimize import OptimizedModel


def apply_plan(model: onnx.ModelProto, plan: PrecisionPlan, stats: CalibrationStats, profile: Profile) -> onnx.ModelProto:
    q = profile.quantization
    out, _ = run_passes(model, [
        QuantizeLinearLayers(plan, stats.ranges, q.activation_type, q.weight_per_channel,
                             {t: (s.inv_scale, stats.smoothed_ranges[t]) for t, s in stats.smoothing.items()},
                             stats.token_quant),
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


def measure_sensitivity(optimized: OptimizedModel, stats: CalibrationStats, profile: Profile) -> Sensitivity:
    """Each linear layer's gain: its output error at static int8 minus at the profile's sensitive precision, relative
    squared error over the sampled calibration tokens (clamped at 0; edgeq/stages/layer_errors.py)."""
    precision = profile.quantization.sensitive_precision
    linear = [d.name for d in decide_precision(optimized.nodes, profile).of("int8")]
    gains = {}
    for name in linear:
        e = stats.layer_errors[name]
        gains[name] = max(0.0, e.static - e.promoted(precision))
    return Sensitivity(gains, min(profile.quantization.sensitivity_samples, stats.samples))


class Candidates:
    """The plans the promotion search chooses among, one per promotion count: planned, carried out and scored on
    calibration text on demand, each count scored once (the closest-fix search asks for the same counts again).
    Models are not kept: a MiniLM QDQ model is ~90 MB, and rebuilding one costs less than scoring it."""

    def __init__(self, optimized: OptimizedModel, model: onnx.ModelProto, stats: CalibrationStats,
                 feeds: list[dict[str, np.ndarray]], profile: Profile, sensitivity: Sensitivity, pooling: str,
                 progress: Progress = QUIET) -> None:
        self.optimized, self.source, self.stats, self.feeds = optimized, model, stats, feeds
        self.profile, self.sensitivity, self.pooling, self.progress = profile, sensitivity, pooling, progress
        self.n = len(sensitivity.gains)
        self._scores: dict[int, EncoderAccuracy] = {}

    def plan(self, k: int) -> PrecisionPlan:
        return decide_precision(self.optimized.nodes, self.profile, self.sensitivity, promote=k)

    def model(self, k: int) -> onnx.ModelProto:
        return apply_plan(self.source, self.plan(k), self.stats, self.profile)

    def save(self, k: int, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(self.model(k), str(path))
        return path

    def score(self, k: int) -> EncoderAccuracy:
        if k not in self._scores:
            acc = self._scores[k] = _score(self.model(k), self.feeds, self.stats.reference, self.pooling)
            precision = self.profile.quantization.sensitive_precision
            self.progress.stage("select", f"{k} of {self.n} linear layers at {precision}: "
                                          f"mean cosine {acc.mean_cosine:.5f}, min {acc.min_cosine:.5f}, "
                                          f"retrieval top-1 {acc.retrieval_top1:.4f} on calibration text")
        return self._scores[k]


@dataclass(frozen=True)
class QuantizedModel:
    optimized: OptimizedModel
    onnx_path: Path
    plan: PrecisionPlan
    sensitivity: Sensitivity
    promoted: int
    calibration_accuracy: EncoderAccuracy  # of the chosen plan, on calibration text (selection, not the gate)
    selection: tuple[SelectionStep, ...] = ()  # the counts tried, the one the targets chose last
    candidates: Candidates | None = None
    size_note: str = ""  # why fewer layers were promoted than the targets chose (policy.encoder.within_size_budget)

    @property
    def targets_met(self) -> bool:
        return bool(self.selection) and not self.selection[-1].unmet and not self.size_note

    def at(self, k: int, note: str, path: Path) -> QuantizedModel:
        """The same search with ``k`` layers promoted instead (``note``: why), its QDQ model written to ``path``."""
        c = self.candidates
        return replace(self, onnx_path=c.save(k, path), plan=c.plan(k), promoted=k, calibration_accuracy=c.score(k),
                       size_note=note)


def quantize(optimized: OptimizedModel, stats: CalibrationStats, tokenizer, texts: tuple[str, ...], profile: Profile,
             pooling: str, workdir: Path, progress: Progress = QUIET) -> QuantizedModel:
    model = optimized.load()
    sens = measure_sensitivity(optimized, stats, profile)
    candidates = Candidates(optimized, model, stats, encode_texts(model, tokenizer, texts, profile), profile, sens,
                            pooling, progress)
    steps = promotion_count(candidates.n, candidates.score, profile)
    k = steps[-1].promoted
    path = candidates.save(k, workdir / "quantized.onnx")
    return QuantizedModel(optimized, path, candidates.plan(k), sens, k, steps[-1].accuracy, steps, candidates)
