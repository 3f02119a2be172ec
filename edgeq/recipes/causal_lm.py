"""Causal LM on the CPU through ONNX Runtime GenAI: source -> export (KV cache) -> fuse -> calibrate -> INT4 ->
package (GenAI folder) -> evaluate against FP32 -> greedy continuation stored for ``edgeq verify``."""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import onnx

from edgeq.errors import CalibrationDataError, ModelFolderError
from edgeq.llm.activations import collect_activation_stats
from edgeq.llm.evaluate import ReferenceLogits, evaluate_lm, token_windows
from edgeq.llm.genai import GENAI_CONFIG, greedy_tokens, write_genai_config
from edgeq.llm.gguf_source import materialize_gguf
from edgeq.llm.greedy import VERIFY_PROMPT, greedy_margins
from edgeq.llm.int4 import QuantizeInt4, measure_int4
from edgeq.llm.tokenizer import check_tokenizer, write_package_tokenizer
from edgeq.manifest import CAUSAL_LM, SCHEMA_VERSION, tool_versions
from edgeq.partitions import partition_report
from edgeq.passes.base import run_passes
from edgeq.passes.fuse_llm import FuseLLM
from edgeq.passes.keep_fp16 import KeepFp16
from edgeq.policy import decide_causal_lm
from edgeq.profiles import LLMSpec
from edgeq.progress import Progress
from edgeq.recipes.base import Built, failed
from edgeq.request import ExportRequest, Inputs
from edgeq.safe_load import load_tokenizer
from edgeq.stages.budget import lm_accuracy_error, lm_size_error
from edgeq.stages.export import export
from edgeq.stages.record import provenance, text_file_record

MODEL_FILE = "model.onnx"


class CausalLM:
    name = CAUSAL_LM

    def build(self, inputs: Inputs, req: ExportRequest, folder: Path, work: Path, progress: Progress) -> Built:
        src, profile, spec = inputs.source, inputs.profile, inputs.profile.llm
        calibration_texts, evaluation_texts = inputs.calibration.texts, inputs.evaluation.texts
        if src.gguf_file:
            progress.stage("dequantize", f"{src.gguf_file} through transformers' GGUF loader")
            src = replace(src, path=materialize_gguf(src.path, src.gguf_file, work / "source"))
        tokenizer = load_tokenizer(src.path)
        hf_config = json.loads((src.path / "config.json").read_text())
        gen_path = src.path / "generation_config.json"
        gen_config = json.loads(gen_path.read_text()) if gen_path.is_file() else None
        cal = calibration_windows(tokenizer, calibration_texts, spec)  # before the export: a short text fails fast
        ev = token_windows(tokenizer, evaluation_texts, spec.window_tokens, spec.eval_windows)
        progress.stage("export", f"{src.path} ({src.architecture}, task {src.task})")
        exported = export(src, work)
        src = exported.source  # pickle weights were staged as safetensors beside links to the other files

        progress.stage("optimize", "fuse attention (GroupQueryAttention), RMSNorm, rotary into ONNX Runtime kernels")
        fuse = FuseLLM(max_positions=int(hf_config.get("max_position_embeddings", spec.context_length)),
                       untie_lm_head=spec.lm_head_precision != "fp16")
        model, results = run_passes(onnx.load(str(exported.onnx_path)), [fuse])
        fused_summary = results[0].summary

        progress.stage("calibrate", f"{len(cal)} windows x {spec.window_tokens} tokens")
        # RTN uses the statistics too: clip search weighted by input energy, scale refit, sensitivity for promotion
        stats = collect_activation_stats(model, cal, progress=progress)
        progress.stage("quantize", f"INT4 {spec.int4_method}, block {spec.block_size}, "
                                   f"{'symmetric' if spec.symmetric else 'asymmetric'}")
        # measure, then decide (edgeq.policy), then the passes carry the plan out
        decided = decide_causal_lm(model, measure_int4(model, stats, spec.block_size, spec.symmetric,
                                                       sensitivities=spec.promote > 0), profile)
        int4 = QuantizeInt4(decided.int4, stats, block_size=spec.block_size, symmetric=spec.symmetric,
                            accuracy_level=spec.accuracy_level, method=spec.int4_method, progress=progress)
        del stats
        plan = decided.nodes
        model, results = run_passes(model, [int4, KeepFp16(plan)])

        progress.stage("package", "ONNX Runtime GenAI folder")
        folder.mkdir(parents=True)
        onnx.save(model, str(folder / MODEL_FILE))
        write_genai_config(folder, MODEL_FILE, folder / MODEL_FILE, hf_config, gen_config, context_length=spec.context_length)
        tok_report = write_package_tokenizer(src.path, folder)
        mismatches = check_tokenizer(src.path, folder, evaluation_texts[:64])
        if mismatches:
            m = mismatches[0]
            raise ModelFolderError(f"the package tokenizer differs from the source on {len(mismatches)} of 64 texts "
                                   f"({m.kind} of {m.text[:40]!r}: {m.expected} vs {m.got})",
                                   "this tokenizer shape is not supported yet; please report it with tokenizer.json")

        progress.stage("evaluate", f"{len(ev)} held-back windows vs FP32")
        with ReferenceLogits(exported.onnx_path, ev, directory=work / "reference", progress=progress) as ref:
            accuracy = evaluate_lm(folder / MODEL_FILE, ref, ev, progress=progress)
        prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": VERIFY_PROMPT}], add_generation_prompt=True)
        tokens = greedy_tokens(folder, prompt_ids, spec.verify_tokens)
        margins = greedy_margins(folder / MODEL_FILE, prompt_ids, tokens)
        size = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
        # the text files' records sit after the profile's (key order is part of a byte-identical manifest)
        recorded = {**provenance(inputs, req), "calibration": text_file_record(inputs.calibration)}
        evaluation_file = text_file_record(inputs.evaluation)
        manifest = {
            "schema_version": SCHEMA_VERSION, "recipe": CAUSAL_LM,
            **recorded,
            "tools": tool_versions(),
            "model": {"file": MODEL_FILE, "format": "onnx", "runtime": "onnxruntime-genai", "genai_config": GENAI_CONFIG,
                      "execution_provider": profile.execution_provider, "fusions": fused_summary},
            "precision": {
                "summary": plan.summary(),
                "int4": {"method": spec.int4_method, "setting": int4.setting, "block_size": spec.block_size,
                         "symmetric": spec.symmetric, "accuracy_level": spec.accuracy_level,
                         "layers_int4": sum(d.bits == 4 for d in results[0].decisions),
                         "layers_int8": sum(d.bits == 8 for d in results[0].decisions),
                         "layers_kept": sum(d.bits == 0 for d in results[0].decisions)},
                "nodes": [{"name": d.name, "op": d.op_type, "category": d.category, "precision": d.precision,
                           "reason": d.reason} for d in plan.decisions],
            },
            "tokenizer": {"rewritten": tok_report.rewritten, "changes": list(tok_report.changes),
                          "add_bos_token": tok_report.add_bos_token, "add_eos_token": tok_report.add_eos_token},
            "calibration": {**recorded["calibration"], "windows": int(len(cal)), "window_tokens": spec.window_tokens},
            "accuracy": {"reference": "FP32 ONNX export of the source, same windows",
                         **{f"evaluation_{k}": v for k, v in evaluation_file.items()}, **asdict(accuracy),
                         "windows": int(len(ev)),
                         "budget": {"max_ppl_increase": spec.max_ppl_increase, "min_top1_agreement": spec.min_top1_agreement}},
            "size": {"model_bytes": size, "max_mb": spec.max_size_mb},
            "partitions": partition_report(folder / MODEL_FILE, profile.package.partition_check_eps),
            "verification": {"prompt": VERIFY_PROMPT, "prompt_ids": [int(i) for i in prompt_ids], "greedy_tokens": tokens,
                             "logit_margins": margins},
        }
        # accuracy first: a model over both budgets is reported for its accuracy
        return Built(manifest, failed(lm_accuracy_error(accuracy, spec), lm_size_error(size, spec)))


def calibration_windows(tokenizer, texts: tuple[str, ...], spec: LLMSpec) -> np.ndarray:
    """``spec.calibration_windows`` windows of the calibration text; fewer than that is an error (GPTQ's statistics
    are sized for them), not a silent cut."""
    windows = token_windows(tokenizer, texts, spec.window_tokens, spec.calibration_windows)
    if len(windows) < spec.calibration_windows:
        raise CalibrationDataError(
            f"the calibration text fills {len(windows)} windows of {spec.window_tokens} tokens; the profile asks for "
            f"llm.calibration_windows = {spec.calibration_windows}",
            f"pass a longer --calibration file, or --set llm.calibration_windows={len(windows)}")
    return windows
