"""``edgeq eval PACKAGE --text FILE``: the package against an FP32 reference on the user's text."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from edgeq.errors import UserInputError
from edgeq.llm.evaluate import ReferenceLogits, evaluate_lm, token_windows
from edgeq.manifest import MANIFEST, Manifest, model_path, read_manifest
from edgeq.manifest_schema import LMAccuracyRecord, malformed
from edgeq.modelsource import check_recorded_source
from edgeq.safe_load import load_tokenizer
from edgeq.textdata import load_texts


def evaluate_package(package: Path, text_file: Path, reference: Path | None = None) -> LMAccuracyRecord:
    """Perplexity, KL and top-1 agreement of the package vs FP32 on ``text_file``. Without ``reference`` the FP32
    model is exported again from the source the manifest names (its hashes must still match)."""
    package = Path(package)
    manifest = read_manifest(package)
    if not manifest.is_llm:
        raise UserInputError(f"{package} is not an LLM package", "edgeq eval measures causal LMs; encoders are "
                             "measured at export (see edgeq inspect)")
    if manifest.source.files is None:  # the FP32 reference is exported again from the source these hashes name
        raise malformed(package / MANIFEST, "source.files", "an object")
    spec = manifest.profile.values.llm
    model = model_path(package, manifest)
    tokenizer = load_tokenizer(package)
    windows = token_windows(tokenizer, load_texts(text_file).texts, spec.window_tokens, spec.eval_windows)
    with tempfile.TemporaryDirectory(prefix="edgeq-eval-") as tmp:
        ref_path = Path(reference) if reference else _fp32_reference(manifest, Path(tmp))
        with ReferenceLogits(ref_path, windows, directory=Path(tmp) / "ref") as ref:
            acc = evaluate_lm(model, ref, windows)
    return LMAccuracyRecord(**asdict(acc))


def _fp32_reference(manifest: Manifest, work: Path) -> Path:
    """The source's FP32 decoder, built by edgeq.decoder as the export builds its layers (every linear in float32,
    weights read a tensor at a time; a GGUF dequantized per tensor): optimum is not needed for causal LMs."""
    from edgeq.checkpoint import checked_weights
    from edgeq.decoder.gguf_weights import gguf_folder
    from edgeq.decoder.graph import write_fp32_decoder
    from edgeq.decoder.spec import decoder_spec
    from edgeq.decoder.weights import open_safetensors

    src_info = manifest.source
    if src_info.path is None:  # manifests record the source by name and file hashes, not where it was
        raise UserInputError(f"the manifest names its source ({src_info.name}) by file hashes, not by path",
                             "pass --reference with the FP32 ONNX model to compare with")
    # the source folder is outside the package by design: checked as any model folder is, and still the one hashed
    src = check_recorded_source(Path(src_info.path), src_info)
    if src.gguf_file:
        folder, source = gguf_folder(src.path / src.gguf_file, work / "source")
    else:
        src = checked_weights(src, work)  # pickle weights (--allow-pickle) staged as safetensors, as at export
        folder, source = src.path, open_safetensors(src.path)
    spec = decoder_spec(json.loads((folder / "config.json").read_text()))
    return write_fp32_decoder(spec, source, work / "fp32",
                              context_length=manifest.profile.values.llm.window_tokens)  # what a window needs
