"""Encoder on the QNN HTP backend (android-qnn-htp), from checked inputs to an (unverified) package folder.

export -> optimize (the encoder stages) -> static graph (fixed shapes, mask bias, HTP rules, QNN fusions)
-> QDQ for HTP (16-bit activations, 8-bit weights, 16-bit for the layers that need them) -> package: the portable
QDQ ``model.onnx`` and ``model_ctx.onnx``, whose one EPContext node embeds the QNN context binary compiled for the
profile's SoC -> accuracy on held-back text (CPU EP, all of ``accuracy.eval_samples``) and on the HTP simulator
(``qnn.verify_samples`` texts, CPU fallback disabled, so every node is on HTP or the run fails).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from edgeq.devices.qnn_htp import compile_context, qnn_module, run_htp
from edgeq.manifest import ENCODER_QNN, SCHEMA_VERSION, stored_rows, tool_versions
from edgeq.metrics import EncoderAccuracy, compare
from edgeq.progress import Progress
from edgeq.qnn.inputs import embed_static, pooled, static_feeds
from edgeq.qnn.quantize import QnnQuantized, quantize_for_htp
from edgeq.qnn.static_graph import portable_qdq, static_graph
from edgeq.recipes.base import Built, failed
from edgeq.request import ExportRequest, Inputs
from edgeq.runtime import embed, session
from edgeq.safe_load import load_tokenizer
from edgeq.stages.budget import qnn_accuracy_error, qnn_size_error
from edgeq.stages.export import export
from edgeq.stages.optimize import optimize
from edgeq.stages.package import copy_encoder_tokenizer
from edgeq.stages.record import (budget_section, model_io, precision_section, provenance, size_report,
                                 text_file_record)

MODEL_FILE = "model.onnx"
CONTEXT_FILE = "model_ctx.onnx"


class EncoderQnn:
    name = ENCODER_QNN

    def build(self, inputs: Inputs, req: ExportRequest, folder: Path, work: Path, progress: Progress) -> Built:
        qnn_module()  # fail before minutes of work when the QNN EP is missing
        src, profile = inputs.source, inputs.profile
        spec = profile.qnn
        progress.stage("export", f"{src.path} ({src.architecture}, task {src.task})")
        exported = export(src, work, progress)
        tokenizer = load_tokenizer(exported.tokenizer_dir)
        optimized = optimize(exported, work)
        progress.stage("static", f"batch {spec.batch_size} x {spec.seq_len} tokens, mask bias {spec.mask_bias}")
        static = static_graph(optimized.load(), spec, work, src.name)
        names = [i.name for i in onnx.load(str(static.onnx_path), load_external_data=False).graph.input]
        cal_texts = inputs.calibration.head(req.samples or spec.calibration_samples)
        cal_feeds = static_feeds(tokenizer, cal_texts, spec.seq_len, spec.batch_size, names)
        sel_texts = cal_texts[: spec.selection_samples]
        fp32 = session(exported.onnx_path)
        sel_ref = embed(fp32, tokenizer, sel_texts, spec.seq_len, src.pooling)
        progress.stage("quantize", f"QDQ a{spec.activation_bits}/w{spec.weight_bits} on {len(cal_texts)} calibration texts")
        quantized = quantize_for_htp(static.onnx_path, tokenizer, cal_feeds, sel_texts, sel_ref, spec, src.pooling,
                                     static.mask_bias_changed, work, profile.qnn.sensitivity_target_mean_cosine, progress)
        folder.mkdir(parents=True, exist_ok=True)
        static = portable_qdq(quantized.onnx_path, folder / MODEL_FILE, static)  # 16-bit weights every HTP takes
        progress.stage("context", f"QNN context binary for soc_model {spec.soc_model} (Hexagon v{spec.htp_arch})")
        compile_placement = compile_context(folder / MODEL_FILE, folder / CONTEXT_FILE, spec.soc_model, spec.htp_arch)
        copy_encoder_tokenizer(exported.tokenizer_dir, folder, src.tokenizer_files)
        eval_texts = inputs.evaluation.head(profile.accuracy.eval_samples)
        progress.stage("evaluate", f"{len(eval_texts)} held-back texts vs FP32 (CPU EP)")
        ref = embed(fp32, tokenizer, eval_texts, spec.seq_len, src.pooling)
        cpu = embed_static(session(folder / MODEL_FILE), tokenizer, eval_texts, spec.seq_len, spec.batch_size, src.pooling)
        accuracy = compare(ref, cpu)
        htp_texts = eval_texts[: spec.verify_samples]
        progress.stage("simulate", f"{len(htp_texts)} held-back texts on the HTP simulator, CPU fallback disabled")
        feeds = static_feeds(tokenizer, htp_texts, spec.seq_len, spec.batch_size, names)
        htp = {}
        for name in (MODEL_FILE, CONTEXT_FILE):
            run = run_htp(folder / name, feeds, spec.soc_model, spec.htp_arch)
            acc = compare(ref[: len(htp_texts)], pooled(run.outputs, feeds, len(htp_texts), src.pooling))
            # no load or run seconds: they differ between identical runs, and the manifest must not
            htp[name] = {"placement": run.placement.to_dict(), "accuracy_vs_fp32": acc.to_dict()}
        manifest = _manifest(inputs, req, folder, tokenizer, quantized, accuracy, htp, compile_placement.to_dict(),
                             static, {"calibration_samples": len(cal_texts), "htp_texts": len(htp_texts)}, fp32)
        manifest["size"] = size_report(folder / MODEL_FILE, exported.onnx_path, profile)
        return Built(manifest, failed(qnn_accuracy_error(profile, accuracy, htp, quantized.promoted, manifest["size"]),
                                      qnn_size_error(manifest["size"])))


def _manifest(inputs: Inputs, req: ExportRequest, folder: Path, tokenizer, quantized: QnnQuantized,
              accuracy: EncoderAccuracy, htp: dict, compile_placement: dict, static, counts: dict, fp32) -> dict:
    src, profile = inputs.source, inputs.profile
    spec = profile.qnn
    sess = session(folder / MODEL_FILE)
    samples = inputs.evaluation.head(profile.package.verify_samples)
    names = [i.name for i in sess.get_inputs()]
    feeds = static_feeds(tokenizer, samples, spec.seq_len, spec.batch_size, names)
    rows = len(feeds) * spec.batch_size  # padded to whole static batches: verify runs them batch by batch
    reference = pooled([sess.run(None, f)[0] for f in feeds], feeds, rows, src.pooling)
    fp32_ref = pooled([fp32.run(None, {i.name: f[i.name] for i in fp32.get_inputs()})[0] for f in feeds], feeds, rows,
                      src.pooling)
    stored = {k: np.concatenate([f[k] for f in feeds]) for k in names}
    return {
        "schema_version": SCHEMA_VERSION, "recipe": ENCODER_QNN,
        **provenance(inputs, req),
        "tools": {**tool_versions(), "onnxruntime-qnn": qnn_module().__version__},
        "model": {
            "file": MODEL_FILE, "format": "onnx", "execution_provider": profile.execution_provider,
            "context_file": CONTEXT_FILE, "batch_size": spec.batch_size, "seq_len": spec.seq_len,
            **model_io(sess),
        },
        "qnn": {
            "soc_model": spec.soc_model, "htp_arch": spec.htp_arch, "backend": "HTP (libQnnHtp.so; x86_64 simulator here)",
            "graph_passes": [{"pass": name, "modified": r.modified, "summary": r.summary}
                             for name, r in static.passes.items()],
            "qnn_preprocess_fused": static.preprocessed,
            "context": {"file": CONTEXT_FILE, "embed_mode": 1, "placement_when_compiled": compile_placement},
            "simulator": {"cpu_ep_fallback": "disabled", "texts": counts["htp_texts"], "runs": htp},
        },
        "calibration": {**text_file_record(inputs.calibration), "samples": counts["calibration_samples"], "seq_len": spec.seq_len,
                        "method": "minmax (onnxruntime.quantization, get_qnn_qdq_config)"},
        "precision": precision_section(quantized.plan, quantized.promoted, quantized.calibration_accuracy,
                                       measure="weight_sqnr_db", digits=2),
        "accuracy": {
            "reference": "FP32 ONNX export of the source, same tokenizer, truncation and pooling",
            "runtime": "CPU EP on model.onnx (QDQ emulated in float); HTP simulator numbers are under qnn.simulator",
            "evaluation_file": inputs.evaluation.path.name, "evaluation_sha256": inputs.evaluation.sha256,
            **accuracy.to_dict(),
            "budget": budget_section(profile),
        },
        "verification": {
            "texts": list(samples) + [""] * (rows - len(samples)), "pooling": src.pooling, "min_cosine": profile.package.verify_min_cosine,
            "max_rel_diff": profile.package.verify_max_rel_diff,
            "inputs": {k: v.tolist() for k, v in stored.items()},
            "reference_pooled": stored_rows(reference),
            "fp32_pooled": stored_rows(fp32_ref[: len(samples)]),  # the real texts; a device check holds them to it
        },
    }
