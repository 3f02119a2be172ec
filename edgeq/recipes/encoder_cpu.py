"""Encoder on the CPU EP: export -> optimize -> calibrate -> quantize (per-layer sensitivity) -> ORT format ->
evaluate against FP32 -> manifest with a stored verification run."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import onnx

from edgeq.manifest import ENCODER_CPU, SCHEMA_VERSION, stored_rows, tool_versions
from edgeq.metrics import EncoderAccuracy
from edgeq.partitions import partition_report
from edgeq.passes.base import run_passes
from edgeq.passes.fuse_linear_bias import FuseIntegerLinearBias
from edgeq.policy.encoder import within_size_budget
from edgeq.profiles import Profile
from edgeq.progress import Progress
from edgeq.recipes.base import Built, failed
from edgeq.request import ExportRequest, Inputs
from edgeq.runtime import encode, pool, session
from edgeq.safe_load import load_tokenizer
from edgeq.stages.budget import encoder_accuracy_error, encoder_size_error, measured
from edgeq.stages.calibrate import calibrate
from edgeq.stages.evaluate import evaluate
from edgeq.stages.export import export
from edgeq.stages.optimize import optimize
from edgeq.stages.package import MODEL_FILE, OPS_CONFIG, convert_to_ort, copy_encoder_tokenizer
from edgeq.stages.quantize import Candidates, QuantizedModel, quantize
from edgeq.stages.remedy import Measured, closest_fix
from edgeq.stages.record import (budget_section, model_io, over_size_ratio, precision_section, provenance, size_report,
                                 text_file_record)


class EncoderCpu:
    name = ENCODER_CPU

    def build(self, inputs: Inputs, req: ExportRequest, folder: Path, work: Path, progress: Progress) -> Built:
        src, profile = inputs.source, inputs.profile
        q = profile.quantization
        progress.stage("export", f"{src.path} ({src.architecture}, task {src.task})")
        exported = export(src, work, progress)
        tokenizer = load_tokenizer(exported.tokenizer_dir)
        progress.stage("optimize", "attention blocks as MultiHeadAttention, then ONNX Runtime basic level")
        optimized = optimize(exported, work, fuse_attention=True)
        progress.stage("optimize", optimized.fusion)
        cal_texts = inputs.calibration.head(q.calibration_samples)
        progress.stage("calibrate", f"{len(cal_texts)} texts from {inputs.calibration.path.name}, {q.calibration_method}")
        stats = calibrate(optimized, tokenizer, cal_texts, q, src.pooling, progress)
        progress.stage("quantize", f"layers ranked by calibration's per-layer errors; promotion search on "
                                   f"{len(cal_texts)} texts")
        quantized = quantize(optimized, stats, tokenizer, cal_texts, profile, src.pooling, work, progress)
        progress.stage("package", f"ORT format for {profile.package.target_platform}")
        builds = OrtBuilds(quantized.candidates, work / "ort", exported.onnx_path, profile)
        k, note = within_size_budget(quantized.promoted, quantized.candidates.n, builds.fits)
        if note:
            progress.stage("package", note)
            quantized = quantized.at(k, note, work / "quantized-within-budget.onnx") if k != quantized.promoted \
                else replace(quantized, size_note=note)
        builds.place(k, folder)
        copy_encoder_tokenizer(exported.tokenizer_dir, folder, src.tokenizer_files)
        evaluated = min(profile.accuracy.eval_samples, len(inputs.evaluation.texts))
        progress.stage("evaluate", f"{evaluated} held-back texts vs FP32")
        accuracy = evaluate(folder / MODEL_FILE, exported.onnx_path, tokenizer, inputs.evaluation, profile, src.pooling)
        manifest = _manifest(inputs, req, quantized, accuracy, folder, tokenizer)
        base = measured(quantized.promoted, accuracy, manifest["size"], profile)
        fix = None
        if not base.passes:
            def measure(k: int) -> Measured:  # the package the export builds with k promoted, as the gate measures it
                progress.stage("closest fix", f"{k} of {quantized.candidates.n} linear layers promoted: ORT format, "
                                              f"then {evaluated} held-back texts")
                model = builds.model(k)
                acc = evaluate(model, exported.onnx_path, tokenizer, inputs.evaluation, profile, src.pooling)
                model.unlink()  # its size is kept
                return measured(k, acc, builds.size(k), profile)

            fix = closest_fix(quantized.candidates, base, measure, builds.size, profile)
        return Built(manifest, failed(encoder_accuracy_error(profile, base, quantized, fix),
                                      encoder_size_error(profile, base, quantized, fix)))


class OrtBuilds:
    """The ORT-format model of each promotion count, converted once: the size budget (``fits``), the package and the
    closest-fix search ask for the same counts. Each is exactly what the export packages for that count."""

    def __init__(self, candidates: Candidates, work: Path, fp32: Path, profile: Profile) -> None:
        self.candidates, self.work, self.fp32, self.profile = candidates, work, fp32, profile
        self._sizes: dict[int, dict] = {}

    def model(self, k: int) -> Path:
        folder = self.work / str(k)
        if not (folder / MODEL_FILE).is_file():
            # the package's graph: each static layer's bias inside its integer GEMM (same outputs to the bit)
            fused, _ = run_passes(self.candidates.model(k), [FuseIntegerLinearBias()])
            onnx_path = self.work / f"{k}.onnx"
            onnx_path.parent.mkdir(parents=True, exist_ok=True)
            onnx.save(fused, str(onnx_path))
            convert_to_ort(onnx_path, folder, self.profile.package.target_platform,
                           self.profile.package.matmulnbits_accuracy_level)
            onnx_path.unlink()
            self._sizes[k] = size_report(folder / MODEL_FILE, self.fp32, self.profile)
        return folder / MODEL_FILE

    def size(self, k: int) -> dict:
        if k not in self._sizes:
            self.model(k)
        return self._sizes[k]

    def fits(self, k: int) -> bool:
        return not over_size_ratio(self.size(k))

    def place(self, k: int, folder: Path) -> None:
        """The package's model.ort and ops config: count ``k``'s, byte for byte."""
        model = self.model(k)
        folder.mkdir(parents=True, exist_ok=True)
        for name in (MODEL_FILE, OPS_CONFIG):
            shutil.copy(model.parent / name, folder / name)


def _manifest(inputs: Inputs, req: ExportRequest, quantized: QuantizedModel, accuracy: EncoderAccuracy,
              folder: Path, tokenizer) -> dict:
    src, profile = inputs.source, inputs.profile
    sess = session(folder / MODEL_FILE)
    samples = inputs.evaluation.head(profile.package.verify_samples)
    feeds = encode(tokenizer, samples, profile.accuracy.eval_seq_len, [i.name for i in sess.get_inputs()])
    reference = pool(sess.run(None, feeds)[0], feeds["attention_mask"], src.pooling)
    fp32 = session(quantized.optimized.exported.onnx_path)
    fp32_ref = pool(fp32.run(None, {i.name: feeds[i.name] for i in fp32.get_inputs()})[0], feeds["attention_mask"],
                    src.pooling)
    plan = quantized.plan
    return {
        "schema_version": SCHEMA_VERSION, "recipe": ENCODER_CPU,
        **provenance(inputs, req),
        "tools": tool_versions(),
        "model": {
            "file": MODEL_FILE, "format": "ort", "ops_config": OPS_CONFIG,
            "execution_provider": profile.execution_provider, "target_platform": profile.package.target_platform,
            **model_io(sess),
        },
        "size": size_report(folder / MODEL_FILE, quantized.optimized.exported.onnx_path, profile),
        "calibration": {**text_file_record(inputs.calibration),
                        "samples": len(inputs.calibration.head(profile.quantization.calibration_samples)),
                        "seq_len": profile.quantization.calibration_seq_len,
                        "method": profile.quantization.calibration_method,
                        "sensitivity_samples": quantized.sensitivity.samples,
                        **_calibration_choices(quantized)},
        "precision": precision_section(plan, quantized.promoted, quantized.calibration_accuracy,
                                       steps=quantized.selection, size_note=quantized.size_note),
        "accuracy": {
            "reference": "FP32 ONNX export of the source, same tokenizer and pooling",
            "evaluation_file": inputs.evaluation.path.name, "evaluation_sha256": inputs.evaluation.sha256,
            **accuracy.to_dict(),
            "budget": budget_section(profile),
        },
        "partitions": partition_report(quantized.onnx_path, profile.package.partition_check_eps),
        "verification": {
            "texts": list(samples), "pooling": src.pooling, "min_cosine": profile.package.verify_min_cosine,
            "max_rel_diff": profile.package.verify_max_rel_diff,
            "device_min_cosine": profile.package.device_min_cosine,
            "device_max_rel_diff": profile.package.device_max_rel_diff,
            "inputs": {k: v.tolist() for k, v in feeds.items()},
            "reference_pooled": stored_rows(reference),
            "fp32_pooled": stored_rows(fp32_ref),  # what a device check holds the target's outputs to
        },
    }


def _calibration_choices(quantized: QuantizedModel) -> dict:
    """What calibration chose for the inputs the package quantizes: each smoothed static input's alpha and each
    per-token input's zero point."""
    if quantized.candidates is None:
        return {}
    stats, plan = quantized.candidates.stats, quantized.plan
    nodes = {n.name: n for n in quantized.candidates.source.graph.node}  # the optimized model, loaded already
    static = {nodes[d.name].input[0] for d in plan.of("int8")}
    token = {nodes[d.name].input[0] for d in plan.of("int8-per-token")}
    return {"smoothing": {x: s.alpha for x, s in sorted(stats.smoothing.items()) if x in static},
            "per_token": {x: stats.token_quant[x].describe() for x in sorted(token)}}
