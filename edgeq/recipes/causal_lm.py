"""Causal LM on the CPU through ONNX Runtime GenAI, one decoder layer at a time: source (safetensors, read a tensor
at a time) -> measure (FP32 layers over calibration and evaluation windows: Hessians, sensitivities, reference) ->
decide (edgeq.policy) -> quantize and write (each layer's INT4/INT8 weights appended to model.onnx.data as made) ->
package (GenAI folder) -> evaluate against FP32 -> greedy continuation stored for ``edgeq verify``. Nothing holds
the whole model in FP32 (edgeq/decoder/)."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import onnx

from edgeq.checkpoint import check_finite_tensors, checked_weights
from edgeq.decoder.graph import DATA_FILE
from edgeq.decoder.layerwise import EMBEDDING, Measured, QuantizedStore, QuantSettings, measure, write_quantized
from edgeq.decoder.gguf_weights import gguf_folder
from edgeq.decoder.spec import DecoderSpec, decoder_spec
from edgeq.decoder.weights import TensorSource, open_safetensors
from edgeq.errors import CalibrationDataError, ModelFolderError
from edgeq.heap import release_freed_memory, return_large_blocks
from edgeq.llm.evaluate import token_windows, evaluate_lm
from edgeq.llm.genai import GENAI_CONFIG
from edgeq.llm.greedy import VERIFY_PROMPT, greedy_margins, package_greedy, verify_prompt_ids
from edgeq.llm.tokenizer import check_tokenizer, write_package_tokenizer
from edgeq.manifest import CAUSAL_LM, SCHEMA_VERSION, tool_versions
from edgeq.partitions import partition_report
from edgeq.policy import Int4Decision, Int4Facts, decide_int4, int4_rules
from edgeq.policy.causal_lm import (PROMOTED_BITS, FixCandidate, decide_decoder_precision, fix_candidates,
                                    linear_bits_per_weight)
from edgeq.profiles import LLMSpec
from edgeq.progress import Progress
from edgeq.recipes.base import Built, failed
from edgeq.request import ExportRequest, Inputs
from edgeq.safe_load import load_tokenizer
from edgeq.stages.budget import lm_accuracy_error, lm_measured, lm_size_error
from edgeq.stages.record import provenance, text_file_record
from edgeq.stages.remedy import MAX_LM_TRIALS, Search, first_passing

MODEL_FILE = "model.onnx"
TABLES = frozenset({EMBEDDING})  # stored FP16 by default (llm.embedding_precision)


class CausalLM:
    name = CAUSAL_LM

    def build(self, inputs: Inputs, req: ExportRequest, folder: Path, work: Path, progress: Progress) -> Built:
        src, profile, spec = inputs.source, inputs.profile, inputs.profile.llm
        return_large_blocks()  # layer-sized temporaries go back when freed, not kept in the heap (edgeq/heap.py)
        calibration_texts, evaluation_texts = inputs.calibration.texts, inputs.evaluation.texts
        source = None
        if src.gguf_file:  # config and tokenizer from its metadata; tensors dequantized one at a time when read
            progress.stage("source", f"{src.gguf_file}: config.json and tokenizer from its metadata")
            folder_from_gguf, source = gguf_folder(src.path / src.gguf_file, work / "source")
            src = replace(src, path=folder_from_gguf)
        tokenizer = load_tokenizer(src.path)
        hf_config = json.loads((src.path / "config.json").read_text())
        gen_path = src.path / "generation_config.json"
        gen_config = json.loads(gen_path.read_text()) if gen_path.is_file() else None
        decoder = decoder_spec(hf_config)  # what the builder cannot reproduce is refused here, before any work
        cal = calibration_windows(tokenizer, calibration_texts, spec)  # so is a calibration text that is too short
        ev = token_windows(tokenizer, evaluation_texts, spec.window_tokens, spec.eval_windows)
        prompt_ids = verify_prompt_ids(tokenizer)  # before any work: a broken chat template fails here
        if source is None:
            progress.stage("weights", "every tensor present, of the config's shape and finite")
            src = checked_weights(src, work)  # complete and finite; pickle weights staged as safetensors
            source = open_safetensors(src.path)
        else:  # the GGUF reader refused missing or unknown tensors already
            progress.stage("dequantize", f"every tensor of {inputs.source.gguf_file}, checked finite")
            check_finite_tensors(source, f"the GGUF {inputs.source.gguf_file} (dequantized)", progress)

        progress.stage("measure", f"{decoder.num_layers} layers one at a time: {len(cal)} calibration windows x "
                                  f"{spec.window_tokens} tokens, {len(ev)} evaluation windows through FP32")
        measured = measure(decoder, source, cal, ev, context_length=spec.context_length, block_size=spec.block_size,
                           symmetric=spec.symmetric, sensitivities=spec.promote > 0,
                           reference_dir=work / "reference", progress=progress)
        rules = int4_rules(spec, TABLES)
        int4 = decide_int4(measured.facts, rules)
        plan = {d.node: d for d in int4}
        packages = Packages(decoder, source, cal, measured, spec, gen_config, work, progress)

        progress.stage("quantize", f"INT4 {spec.int4_method}, block {spec.block_size}, "
                                   f"{'symmetric' if spec.symmetric else 'asymmetric'}, written layer by layer")
        packages.write(int4, spec, folder)
        tok_report = write_package_tokenizer(src.path, folder)
        mismatches = check_tokenizer(src.path, folder, evaluation_texts[:64])
        if mismatches:
            m = mismatches[0]
            raise ModelFolderError(f"the package tokenizer differs from the source on {len(mismatches)} of 64 texts "
                                   f"({m.kind} of {m.text[:40]!r}: {m.expected} vs {m.got})",
                                   "this tokenizer shape is not supported yet; please report it with tokenizer.json")

        release_freed_memory()  # the quantize stage's freed buffers, before the package is run (whole, or in parts)
        progress.stage("evaluate", f"{len(ev)} held-back windows vs FP32")
        accuracy = evaluate_lm(folder / MODEL_FILE, measured.reference, ev, progress=progress)
        tokens, greedy_runtime = package_greedy(folder, prompt_ids, spec.verify_tokens, progress)
        margins = greedy_margins(folder / MODEL_FILE, prompt_ids, tokens)
        size = model_bytes(folder)
        bits = linear_bits_per_weight(int4, spec.block_size, spec.symmetric)
        graph = onnx.load(str(folder / MODEL_FILE), load_external_data=False)
        nodes = decide_decoder_precision(graph, plan, profile)
        # the text files' records sit after the profile's (key order is part of a byte-identical manifest)
        recorded = {**provenance(inputs, req), "calibration": text_file_record(inputs.calibration)}
        evaluation_file = text_file_record(inputs.evaluation)
        manifest = {
            "schema_version": SCHEMA_VERSION, "recipe": CAUSAL_LM,
            **recorded,
            "tools": tool_versions(),
            "model": {"file": MODEL_FILE, "format": "onnx", "runtime": "onnxruntime-genai", "genai_config": GENAI_CONFIG,
                      "execution_provider": profile.execution_provider, "fusions": op_counts(graph),
                      "external_data": DATA_FILE},
            "precision": {
                "summary": nodes.summary(),
                "int4": {"method": spec.int4_method, "setting": rules.setting, "block_size": spec.block_size,
                         "symmetric": spec.symmetric, "accuracy_level": spec.accuracy_level,
                         "layers_int4": sum(d.bits == 4 for d in int4), "layers_int8": sum(d.bits == 8 for d in int4),
                         "layers_kept": sum(d.bits == 0 for d in int4)},
                "nodes": [{"name": d.name, "op": d.op_type, "category": d.category, "precision": d.precision,
                           "reason": d.reason} for d in nodes.decisions],
            },
            "tokenizer": {"rewritten": tok_report.rewritten, "changes": list(tok_report.changes),
                          "add_bos_token": tok_report.add_bos_token, "add_eos_token": tok_report.add_eos_token},
            "calibration": {**recorded["calibration"], "windows": int(len(cal)), "window_tokens": spec.window_tokens},
            "accuracy": {"reference": "FP32 forward of the source, layer by layer, same windows",
                         **{f"evaluation_{k}": v for k, v in evaluation_file.items()}, **asdict(accuracy),
                         "windows": int(len(ev)),
                         "budget": {"max_ppl_increase": spec.max_ppl_increase, "min_top1_agreement": spec.min_top1_agreement}},
            "size": size_section(size, bits, spec),
            "partitions": partition_report(folder / MODEL_FILE, profile.package.partition_check_eps),
            "verification": {"prompt": VERIFY_PROMPT, "prompt_ids": [int(i) for i in prompt_ids], "greedy_tokens": tokens,
                             "logit_margins": margins, "greedy_runtime": greedy_runtime},
        }
        base = lm_measured(_int8(int4), accuracy, manifest["size"], spec)
        accuracy_error = lm_accuracy_error(base, spec, packages.closest_fix(spec, ev)) if base.accuracy_failures \
            else None
        measured.reference.close()
        # accuracy first: a model over both budgets is reported for its accuracy
        return Built(manifest, failed(accuracy_error, lm_size_error(size, bits, spec)))


class Packages:
    """Pass 2 for a plan, after pass 1: the export's package, then each closest-fix candidate's (edgeq/stages/remedy.py),
    built as an export given its setting builds it. The quantized linears are kept (``QuantizedStore``), so a
    candidate quantizes only the layers whose bits or settings change."""

    def __init__(self, decoder: DecoderSpec, source: TensorSource, calibration: np.ndarray, measured: Measured,
                 spec: LLMSpec, generation_config: dict | None, work: Path, progress: Progress) -> None:
        self.decoder, self.source, self.calibration, self.measured = decoder, source, calibration, measured
        self.generation_config, self.work, self.progress = generation_config, work, progress
        self.store = QuantizedStore(work / "quantized")
        # the sensitivities pass 1 measured, by (block size, symmetric); none when the profile promotes none
        self._facts = {(spec.block_size, spec.symmetric): measured.facts} if spec.promote > 0 else {}

    def write(self, plan: tuple[Int4Decision, ...], spec: LLMSpec, folder: Path) -> None:
        settings = QuantSettings(spec.int4_method, spec.block_size, spec.symmetric, spec.accuracy_level)
        write_quantized(self.decoder, self.source, self.calibration, self.measured, plan, settings, folder,
                        embedding_precision=spec.embedding_precision, context_length=spec.context_length,
                        generation_config=self.generation_config, store=self.store, progress=self.progress)

    def facts(self, spec: LLMSpec, stage: str) -> Int4Facts:
        """The facts an export with ``spec`` measures, sensitivities included: pass 1's, or measured again (the
        calibration windows alone) at another block size or symmetry, or when pass 1 measured none."""
        key = (spec.block_size, spec.symmetric)
        if key not in self._facts:
            self.progress.stage("closest fix", f"{stage}sensitivities at block {spec.block_size}, "
                                               f"{'symmetric' if spec.symmetric else 'asymmetric'}: "
                                               f"{len(self.calibration)} calibration windows through FP32")
            self._facts[key] = measure(self.decoder, self.source, self.calibration, None,
                                       context_length=spec.context_length, block_size=spec.block_size,
                                       symmetric=spec.symmetric, progress=self.progress).facts
        return self._facts[key]

    def closest_fix(self, spec: LLMSpec, evaluation: np.ndarray) -> Search:
        """The settings ``fix_candidates`` lists, built and measured on the held-back windows until one passes."""
        candidates = fix_candidates(self.facts(spec, "this export's "), spec, TABLES)
        n = min(len(candidates), MAX_LM_TRIALS)

        def measure_one(c: FixCandidate) -> Measured:
            step = f"{candidates.index(c) + 1}/{n}: --set {c.setting}"
            plan = decide_int4(self.facts(c.spec, f"{step}: "), int4_rules(c.spec, TABLES)) if c.remeasure else c.plan
            self.progress.stage("closest fix", f"{step} ({_int8(plan)} linear layers at 8 bits): pass 2, then "
                                               f"{len(evaluation)} held-back windows")
            folder = self.work / "closest-fix"
            shutil.rmtree(folder, ignore_errors=True)
            self.write(plan, c.spec, folder)
            acc = evaluate_lm(folder / MODEL_FILE, self.measured.reference, evaluation, progress=self.progress)
            size = size_section(model_bytes(folder), linear_bits_per_weight(plan, c.spec.block_size,
                                                                             c.spec.symmetric), c.spec)
            self.store.spill(folder)  # the linears it quantized are kept
            shutil.rmtree(folder)
            return lm_measured(_int8(plan), acc, size, c.spec)

        return first_passing(candidates, measure_one)


def _int8(plan: tuple[Int4Decision, ...]) -> int:
    return sum(d.bits == PROMOTED_BITS for d in plan)


def model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("model.onnx*"))


def size_section(size: int, bits: float, spec: LLMSpec) -> dict:
    return {"model_bytes": size, "max_mb": spec.max_size_mb, "bits_per_weight": bits,
            "max_bits_per_weight": spec.max_bits_per_weight}


def op_counts(model: onnx.ModelProto) -> str:
    """How many of each fused ONNX Runtime op the decoder runs (what the CPU EP's speed rests on)."""
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain == "com.microsoft" or node.op_type == "SimplifiedLayerNormalization":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return "built fused: " + ", ".join(f"{n} {op}" for op, n in sorted(counts.items()))


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
