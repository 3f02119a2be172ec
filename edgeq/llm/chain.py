"""The causal-LM chain: source -> export (KV cache) -> fuse -> calibrate -> INT4 -> package (GenAI) -> evaluate.

Called by ``edgeq.pipeline.export_package`` inside its staging folder; returns the finished package folder (manifest
written, budgets checked, verified), which the pipeline then zips and moves into place.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx

from edgeq.errors import AccuracyBudgetError, CalibrationDataError, ModelFolderError, SizeBudgetError
from edgeq.llm.activations import collect_activation_stats
from edgeq.llm.evaluate import LMAccuracy, ReferenceLogits, evaluate_lm, token_windows
from edgeq.llm.genai import GENAI_CONFIG, greedy_tokens, write_genai_config
from edgeq.llm.gguf_source import materialize_gguf
from edgeq.llm.int4 import QuantizeInt4, measure_int4
from edgeq.llm.tokenizer import check_tokenizer, write_package_tokenizer
from edgeq.manifest import SCHEMA_VERSION, tool_versions
from edgeq.modelsource import ModelSource
from edgeq.partitions import partition_report
from edgeq.passes.base import run_passes
from edgeq.passes.fuse_llm import FuseLLM
from edgeq.passes.keep_fp16 import KeepFp16
from edgeq.policy import decide_causal_lm
from edgeq.profiles import LLMSpec, Profile
from edgeq.progress import Progress
from edgeq.safe_load import load_tokenizer
from edgeq.stages.export import export
from edgeq.stages.package import finish

MODEL_FILE = "model.onnx"
# A fixed chat prompt whose greedy continuation is stored for `edgeq verify` and compared across devices. It asks
# for a continuation with clear margins between the top two next tokens: greedy equality across CPUs then tests the
# kernels, not a coin toss at a near-tie. Measured on SmolLM2-135M's default package: "What is the capital of France?
# Answer in one sentence." has a 0.29-logit gap at its first token ("Paris" vs "The") and 0.06 at its 11th, and
# aarch64 ORT (MatMulNBits accuracy_level 4, int8 activations) took the other branch at position 0; counting has a
# smallest gap of 0.95 over 16 tokens, and arm64 gave the same 16 tokens as x86.
VERIFY_PROMPT = "Count from 1 to 20, separated by commas."


@dataclass(frozen=True)
class LLMInputs:
    source: ModelSource
    profile: Profile
    calibration_texts: tuple[str, ...]
    evaluation_texts: tuple[str, ...]


def build_llm_package(inp: LLMInputs, folder: Path, work: Path, progress: Progress, provenance: dict) -> dict:
    """Write the GenAI package into ``folder``; return its manifest. Raises on a budget or verification failure."""
    src, profile, spec = inp.source, inp.profile, inp.profile.llm
    if src.gguf_file:
        progress.stage("dequantize", f"{src.gguf_file} through transformers' GGUF loader")
        src = replace(src, path=materialize_gguf(src.path, src.gguf_file, work / "source"))
    tokenizer = load_tokenizer(src.path)
    hf_config = json.loads((src.path / "config.json").read_text())
    gen_path = src.path / "generation_config.json"
    gen_config = json.loads(gen_path.read_text()) if gen_path.is_file() else None
    cal = calibration_windows(tokenizer, inp.calibration_texts, spec)  # before the export: a short text fails fast
    ev = token_windows(tokenizer, inp.evaluation_texts, spec.window_tokens, spec.eval_windows)
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
    mismatches = check_tokenizer(src.path, folder, inp.evaluation_texts[:64])
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
    provenance = dict(provenance)
    evaluation_file = provenance.pop("evaluation", {})
    manifest = {
        "schema_version": SCHEMA_VERSION,
        **provenance,
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
        "calibration": {**provenance.get("calibration", {}), "windows": int(len(cal)),
                        "window_tokens": spec.window_tokens},
        "accuracy": {"reference": "FP32 ONNX export of the source, same windows",
                     **{f"evaluation_{k}": v for k, v in evaluation_file.items()}, **asdict(accuracy),
                     "windows": int(len(ev)),
                     "budget": {"max_ppl_increase": spec.max_ppl_increase, "min_top1_agreement": spec.min_top1_agreement}},
        "size": {"model_bytes": size, "max_mb": spec.max_size_mb},
        "partitions": partition_report(folder / MODEL_FILE, profile.package.partition_check_eps),
        "verification": {"prompt": VERIFY_PROMPT, "prompt_ids": [int(i) for i in prompt_ids], "greedy_tokens": tokens,
                         "logit_margins": margins},
    }
    finish(folder, manifest)
    check_llm_budget(accuracy, size, profile)
    return manifest


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


def check_llm_budget(acc: LMAccuracy, size: int, profile: Profile) -> None:
    spec = profile.llm
    failures = []
    if not acc.ppl_increase <= spec.max_ppl_increase:
        failures.append(f"perplexity {acc.perplexity:.2f} vs FP32 {acc.ref_perplexity:.2f} "
                        f"(+{acc.ppl_increase:.1%} > +{spec.max_ppl_increase:.0%})")
    if not acc.top1_agreement >= spec.min_top1_agreement:
        failures.append(f"top-1 agreement {acc.top1_agreement:.3f} < {spec.min_top1_agreement}")
    if failures:
        raise AccuracyBudgetError(f"accuracy over budget on {acc.tokens} held-back tokens: {'; '.join(failures)}",
                                  "try " + ", ".join(_more_accurate(spec)) + " (--set KEY=VALUE)")
    if size > spec.max_size_mb * 1e6:
        raise SizeBudgetError(f"model is {size / 1e6:.1f} MB, over the profile's {spec.max_size_mb:.0f} MB",
                              "raise llm.max_size_mb, or use llm.lm_head_precision = 'int4' / a larger block_size")


def _more_accurate(spec) -> list[str]:
    """Settings that cost size or time for accuracy, from the ones this export did not use."""
    tips = []
    if spec.int4_method != "gptq":
        tips.append("llm.int4_method=gptq")
    if spec.symmetric:
        tips.append("llm.symmetric=false")
    if spec.block_size > 16:
        tips.append(f"llm.block_size={spec.block_size // 2}")
    if not spec.int8_kv:
        tips.append("llm.int8_kv=true")
    tips.append(f"llm.promote={max(spec.promote / 2, 1.0) if spec.promote else 2.0:g} with a larger llm.max_size_mb")
    return tips


def match_tokens(got: list[int], want: list[int], margins: list[float] | None = None) -> tuple[bool, str]:
    """(equal, a line saying so or where they first differ, with the reference's top-2 logit gap there if known:
    a small gap means a near-tie flipped, a large one a kernel computing something else)."""
    same = got == want
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    if same:
        return True, f"{len(got)} greedy tokens equal the reference"
    gap = f" (the reference's top-2 logit gap there: {margins[first]:.3f})" if margins and first < len(margins) else ""
    return False, f"greedy tokens differ from position {first}{gap}: {got} vs {want}"


def greedy_margins(model: Path, prompt_ids: list[int], tokens: list[int]) -> list[float]:
    """Logit gap between the top two next tokens at every greedy step (teacher-forced over prompt + tokens)."""
    import numpy as np

    from edgeq.llm.evaluate import window_logits
    from edgeq.runtime import session

    logits = window_logits(session(model), np.asarray(list(prompt_ids) + list(tokens[:-1]), dtype=np.int64))
    top2 = np.sort(logits[len(prompt_ids) - 1:], axis=-1)[:, -2:]
    return [round(float(b - a), 4) for a, b in top2]
