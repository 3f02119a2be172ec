"""The whole export: validate every input first, then run the stages in a staging folder and move the package
into place only after the accuracy gate and verification passed. Nothing half-written is ever left at OUT."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import onnxruntime as ort

from edgeq.errors import (AccuracyBudgetError, ModelFolderError, OutputExistsError, SizeBudgetError,
                          UnsupportedModelError, UserInputError, VerificationError)
from edgeq.manifest import ENCODER_CPU, SCHEMA_VERSION, stored_rows, tool_versions
from edgeq.metrics import EncoderAccuracy, compare
from edgeq.modelsource import ModelSource, inspect_model_dir
from edgeq.partitions import partition_report
from edgeq.profiles import Profile, load_profile
from edgeq.progress import QUIET, Progress
from edgeq.runtime import embed, encode, pool, session
from edgeq.safe_load import load_tokenizer
from edgeq.staging import space_needed, staged, write_zip
from edgeq.stages.calibrate import calibrate
from edgeq.stages.export import export
from edgeq.stages.optimize import optimize
from edgeq.stages.package import MODEL_FILE, OPS_CONFIG, Package, convert_to_ort, copy_tokenizer, finish
from edgeq.stages.quantize import QuantizedModel, quantize
from edgeq.stages.verify import verify
from edgeq.textdata import (CALIBRATION_FILE, EVALUATION_FILE, TextSet, check_disjoint, fit_calibration_samples,
                            load_texts)


@dataclass(frozen=True)
class ExportRequest:
    model_dir: Path
    profile: str
    out_dir: Path = Path("build")
    calibration: Path | None = None
    samples: int | None = None  # overrides profile.quantization.calibration_samples
    seq_len: int | None = None  # overrides profile.quantization.calibration_seq_len
    force: bool = False
    gguf_file: str | None = None  # a GGUF in model_dir to dequantize and export (causal LMs)
    allow_pickle: bool = False  # --allow-pickle: pytorch_model.bin weights, loaded with torch.load(weights_only=True)
    settings: tuple[tuple[str, object], ...] = ()  # profile fields set over the file's (--set, --int4-method, ...)


@dataclass(frozen=True)
class Inputs:
    source: ModelSource
    profile: Profile
    calibration: TextSet
    evaluation: TextSet
    dest: Path


def check_inputs(req: ExportRequest) -> Inputs:
    """Every user mistake is caught here, before minutes of work."""
    profile = load_profile(req.profile, overrides=dict(req.settings))
    source = inspect_model_dir(req.model_dir, req.gguf_file, req.allow_pickle)
    if source.kind not in profile.model_kinds:
        raise UnsupportedModelError(f"profile '{profile.name}' does not take {source.kind} models",
                                    f"it takes: {', '.join(profile.model_kinds)}")
    q = profile.quantization
    if req.seq_len is not None and profile.execution_provider == "QNNExecutionProvider":  # the static shape
        profile = replace(profile, qnn=replace(profile.qnn, seq_len=req.seq_len))
    if req.samples is not None or req.seq_len is not None:
        q = replace(q, calibration_samples=req.samples or q.calibration_samples,
                    calibration_seq_len=req.seq_len or q.calibration_seq_len)
        profile = replace(profile, quantization=q)
    calibration = load_texts(req.calibration or CALIBRATION_FILE)
    evaluation = load_texts(EVALUATION_FILE)
    check_disjoint(calibration, evaluation)
    if source.kind == "causal-lm":  # numbers the model cannot take fail here, not minutes into the run
        from edgeq.llm.limits import check_llm_lengths

        if req.samples is not None:
            raise UserInputError("--samples counts calibration texts for encoders; a causal LM calibrates on "
                                 "llm.calibration_windows windows of llm.window_tokens tokens",
                                 "drop --samples; use --set llm.calibration_windows=N")
        check_llm_lengths(source, profile.llm)
    else:
        profile = fit_calibration_samples(profile, calibration, req.samples, dict(req.settings))
    if Path(req.out_dir).exists() and not Path(req.out_dir).is_dir():
        raise OutputExistsError(f"output path {req.out_dir} is a file, not a folder", "pass -o a folder (it is created if missing)")
    dest = Path(req.out_dir) / f"{source.name}-{profile.name}"
    # the profile name is plain (edgeq.profiles.check_profile_name); the model's comes from a folder or GGUF file
    # name: 'export --force' replaces dest, so it must be a folder directly inside OUT, never a hidden one
    if source.name.startswith(".") or any(c in source.name for c in "/\\") or not source.name.isprintable():
        raise ModelFolderError(f"the model name {source.name!r} cannot name a package folder",
                               "rename the model folder (or GGUF file) to letters, digits, '.', '_' and '-'")
    if dest.resolve().parent != Path(req.out_dir).resolve():
        raise OutputExistsError(f"{dest} does not resolve to a folder directly inside {req.out_dir} (a symlink?)",
                                "remove it, or pass -o to write elsewhere")
    if dest.exists() and not req.force:
        raise OutputExistsError(f"{dest} already exists", "pass --force to replace it, or -o to write elsewhere")
    return Inputs(source, profile, calibration, evaluation, dest)


def export_package(req: ExportRequest, progress: Progress = QUIET) -> Package:
    inputs = check_inputs(req)
    with staged(inputs.dest, req.force, space_needed(inputs.source, inputs.profile)) as stage:
        folder, work = stage.folder, stage.work
        if inputs.source.kind == "causal-lm":
            manifest = _build_llm(inputs, req, folder, work, progress)
        elif inputs.profile.execution_provider == "QNNExecutionProvider":
            from edgeq.qnn.chain import build_qnn_package  # the QNN EP plugin is an optional extra

            manifest = build_qnn_package(inputs, req, folder, work, progress)
        else:
            manifest = build_encoder_package(inputs, req, folder, work, progress)
        progress.stage("verify", str(folder))
        if inputs.profile.package.zip:
            write_zip(folder)
        report = verify(folder, profile=inputs.profile)  # the bars it was built with, --set included
        if not report.ok:
            bad = "; ".join(f"{n}: {d}" for n, ok, d in report.checks if not ok)
            raise VerificationError(f"fresh package failed verification: {bad}", "this is an edgeq bug; please report it")
        stage.place()
    size = sum(e["size"] for n, e in manifest["files"].items() if n.startswith("model."))
    progress.stage("done", f"{inputs.dest} ({size / 1e6:.1f} MB model)")
    return Package(inputs.dest, manifest)


def _build_llm(inputs: Inputs, req: ExportRequest, folder: Path, work: Path, progress: Progress) -> dict:
    from edgeq.llm.chain import LLMInputs, build_llm_package  # torch/transformers-heavy: only for causal LMs

    provenance = _provenance(inputs, req)
    provenance["calibration"] = text_file_record(inputs.calibration)
    provenance["evaluation"] = text_file_record(inputs.evaluation)
    return build_llm_package(LLMInputs(inputs.source, inputs.profile, inputs.calibration.texts,
                                       inputs.evaluation.texts), folder, work, progress, provenance)


def build_encoder_package(inputs: Inputs, req: ExportRequest, folder: Path, work: Path, progress: Progress) -> dict:
    """The encoder chain; returns the manifest of the package written (unverified) into ``folder``."""
    src, profile = inputs.source, inputs.profile
    q = profile.quantization
    progress.stage("export", f"{src.path} ({src.architecture}, task {src.task})")
    exported = export(src, work)
    tokenizer = load_tokenizer(exported.tokenizer_dir)
    progress.stage("optimize", "ONNX Runtime basic level (provider-independent)")
    optimized = optimize(exported, work)
    cal_texts = inputs.calibration.head(q.calibration_samples)
    progress.stage("calibrate", f"{len(cal_texts)} texts from {inputs.calibration.path.name}, {q.calibration_method}")
    stats = calibrate(optimized, tokenizer, cal_texts, q, src.pooling, progress)
    progress.stage("quantize", f"per-layer sensitivity on {min(q.sensitivity_samples, len(cal_texts))} texts")
    quantized = quantize(optimized, stats, tokenizer, cal_texts, profile, src.pooling, work, progress)
    progress.stage("package", f"ORT format for {profile.package.target_platform}")
    convert_to_ort(quantized.onnx_path, folder, profile.package.target_platform,
                   profile.package.matmulnbits_accuracy_level)
    # the source's tokenizer files, plus the fast-tokenizer files optimum writes even for a vocab.txt-only source
    copy_tokenizer(exported.tokenizer_dir, folder, tuple(dict.fromkeys(
        src.tokenizer_files + ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"))))
    progress.stage("evaluate", f"{min(profile.accuracy.eval_samples, len(inputs.evaluation.texts))} held-back texts vs FP32")
    accuracy = evaluate(folder / MODEL_FILE, exported.onnx_path, tokenizer, inputs.evaluation, profile, src.pooling)
    manifest = build_manifest(inputs, req, quantized, accuracy, folder, tokenizer)
    finish(folder, manifest)
    check_budget(profile, accuracy, quantized)
    check_size(manifest["size"], quantized)
    return manifest


def evaluate(model_path: Path, fp32_path: Path, tokenizer, evaluation: TextSet, profile: Profile, pooling: str) -> EncoderAccuracy:
    texts = evaluation.head(profile.accuracy.eval_samples)
    seq = profile.accuracy.eval_seq_len
    ref = embed(session(fp32_path), tokenizer, texts, seq, pooling)
    out = embed(session(model_path), tokenizer, texts, seq, pooling)
    return compare(ref, out)


def check_budget(profile: Profile, acc: EncoderAccuracy, quantized: QuantizedModel) -> None:
    b = profile.accuracy
    failures = [f"{name} {got:.4f} < {need}" for name, got, need in (
        ("mean cosine", acc.mean_cosine, b.min_mean_cosine),
        ("min cosine", acc.min_cosine, b.min_min_cosine),
        ("retrieval top-1 agreement", acc.retrieval_top1, b.min_retrieval_top1),
    ) if not got >= need]  # NaN fails too
    if failures:
        worst = quantized.sensitivity.ranking()[:5]
        named = ", ".join(f"{n} ({quantized.sensitivity.drops[n]:.2e})" for n in worst)
        raise AccuracyBudgetError(
            f"accuracy over budget on {acc.samples} held-back texts: {'; '.join(failures)}. "
            f"Most sensitive layers (mean-cosine drop alone at int8): {named}",
            "raise quantization.sensitivity_target_mean_cosine in the profile, list layers in keep_fp32_nodes, or "
            "calibrate on text closer to your use (--calibration)",
        )


# Below this FP32 size the ORT format's fixed tables (node and kernel records, ~0.1-0.2 MB) outweigh the weights and
# the ratio says nothing about quantization: a 2-layer test BERT of 0.6 MB packs to 0.3 MB whatever its precision.
SIZE_CHECK_MIN_BYTES = 8_000_000


def size_report(model_path: Path, fp32_path: Path, profile: Profile) -> dict:
    model = model_path.stat().st_size
    fp32 = sum(p.stat().st_size for p in fp32_path.parent.glob(fp32_path.name + "*"))  # with external data
    return {"model_bytes": model, "fp32_onnx_bytes": fp32, "ratio": round(model / fp32, 4),
            "max_ratio": profile.package.max_size_ratio, "checked": fp32 >= SIZE_CHECK_MIN_BYTES}


def check_size(size: dict, quantized: QuantizedModel) -> None:
    if size["checked"] and size["ratio"] > size["max_ratio"]:
        raise SizeBudgetError(
            f"model is {size['model_bytes'] / 1e6:.1f} MB, {size['ratio']:.1%} of the FP32 export "
            f"({size['fp32_onnx_bytes'] / 1e6:.1f} MB); the profile allows {size['max_ratio']:.0%} "
            f"({quantized.promoted} layers were promoted to the sensitive precision)",
            "raise package.max_size_ratio in the profile, or lower quantization.sensitivity_target_mean_cosine",
        )


def _provenance(inputs: Inputs, req: ExportRequest) -> dict:
    """What the package was made from: source files' hashes and the profile as applied.

    Only what identical runs share: no creation time and no local paths (the source by its name and file hashes,
    the profile and text files by name and sha256), so the same inputs give a byte-identical manifest and
    ``edgeq verify --rebuild`` can compare one."""
    src, profile = inputs.source, inputs.profile
    profile_file = Path(profile.source).name
    return {
        "source": {"name": src.name, "model_type": src.model_type, "architecture": src.architecture,
                   "task": src.task, "kind": src.kind, "pooling": src.pooling, "gguf_file": src.gguf_file,
                   "allow_pickle": req.allow_pickle, "weight_format": src.weight_format,
                   "weight_files": list(src.weight_files), "files": src.file_hashes},
        "profile": {"name": profile.name, "file": profile_file, "sha256": profile.sha256,
                    "overrides": {"calibration_samples": req.samples, "calibration_seq_len": req.seq_len,
                                  **dict(req.settings)},
                    # values after the command line's overrides
                    "values": {**profile.to_dict(), "source": profile_file}},
    }


def text_file_record(texts: TextSet) -> dict:
    """A calibration or evaluation file as the manifest names it: file name and sha256, not where it was."""
    return {"file": texts.path.name, "sha256": texts.sha256}


def precision_section(plan, promoted: int, selection: EncoderAccuracy, measure: str = "sensitivity",
                      digits: int = 7) -> dict:
    """The manifest's per-node precision record; ``measure`` names what NodeDecision.sensitivity holds."""
    return {
        "summary": plan.summary(),
        "promoted_sensitive_layers": promoted,
        "selection_accuracy_on_calibration_text": selection.to_dict(),
        "nodes": [{"name": d.name, "op": d.op_type, "category": d.category, "role": d.role,
                   "precision": d.precision, "reason": d.reason,
                   **({measure: round(d.sensitivity, digits)} if d.sensitivity is not None else {})}
                  for d in plan.decisions],
    }


def budget_section(profile: Profile) -> dict:
    b = profile.accuracy
    return {"min_mean_cosine": b.min_mean_cosine, "min_min_cosine": b.min_min_cosine,
            "min_retrieval_top1": b.min_retrieval_top1}


def build_manifest(inputs: Inputs, req: ExportRequest, quantized: QuantizedModel, accuracy: EncoderAccuracy,
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
        **_provenance(inputs, req),
        "tools": tool_versions(),
        "model": {
            "file": MODEL_FILE, "format": "ort", "ops_config": OPS_CONFIG,
            "execution_provider": profile.execution_provider, "target_platform": profile.package.target_platform,
            "inputs": [{"name": i.name, "dtype": i.type, "shape": i.shape} for i in sess.get_inputs()],
            "outputs": [{"name": o.name, "dtype": o.type, "shape": o.shape} for o in sess.get_outputs()],
            "ort_version": ort.__version__,
        },
        "size": size_report(folder / MODEL_FILE, quantized.optimized.exported.onnx_path, profile),
        "calibration": {**text_file_record(inputs.calibration),
                        "samples": len(inputs.calibration.head(profile.quantization.calibration_samples)),
                        "seq_len": profile.quantization.calibration_seq_len,
                        "method": profile.quantization.calibration_method,
                        "sensitivity_samples": quantized.sensitivity.samples},
        "precision": precision_section(plan, quantized.promoted, quantized.calibration_accuracy),
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
