"""edgeq.llm.eval_cmd (``edgeq eval``): a tiny Llama package measured on a text file, read through the typed
manifest. Against itself as the reference, the package must agree exactly: the same perplexity, no KL, every top-1."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.llm.eval_cmd import evaluate_package
from edgeq.manifest import read_manifest
from edgeq.manifest_schema import LMAccuracyRecord
from edgeq.pipeline import ExportRequest, export_package

TEXT = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog, then counts to {i}." for i in range(200))


@pytest.fixture(scope="module")
def package(tiny_dir, tmp_path_factory):
    # the settings of tests/recipes/test_causal_lm.py: a 128-position model, a budget a random model passes
    settings = {"llm.window_tokens": 128, "llm.context_length": 128, "llm.eval_windows": 2,
                "llm.max_ppl_increase": 1.0, "llm.min_top1_agreement": 0.0}
    out = tmp_path_factory.mktemp("eval-out")
    return export_package(ExportRequest(tiny_dir, "android-arm64", out_dir=out, settings=tuple(settings.items())))


def test_the_package_against_itself_agrees_exactly(package, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    assert read_manifest(package.path).recipe == "causal-lm"  # what the LLM writer records
    acc = evaluate_package(package.path, text, reference=package.path / "model.onnx")
    assert isinstance(acc, LMAccuracyRecord)
    assert acc.tokens == 2 * 127  # eval_windows windows of window_tokens, each predicting all but its first token
    assert acc.perplexity == pytest.approx(acc.ref_perplexity, rel=1e-6)
    assert acc.ppl_increase == pytest.approx(0, abs=1e-6)
    assert acc.mean_kl == pytest.approx(0, abs=1e-6) and acc.top1_agreement == 1.0
    result = CliRunner().invoke(main, ["eval", str(package.path), "--text", str(text),
                                       "--reference", str(package.path / "model.onnx")])
    assert result.exit_code == 0, result.output
    assert re.fullmatch(r"accuracy vs FP32 on 254 held-back tokens: perplexity [\d.]+ vs [\d.]+ \([+-]0\.00%; 95% "
                        r"over windows [+-]0\.0% to [+-]0\.0%\), mean KL [-]?0\.0000, top-1 agreement 1\.000\n",
                        result.stdout), result.stdout


def test_without_a_reference_a_package_naming_its_source_by_hashes_says_so(package, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    result = CliRunner().invoke(main, ["eval", str(package.path), "--text", str(text)])
    assert result.exit_code == 2, result.output
    assert "the manifest names its source (tiny-llama) by file hashes, not by path" in result.stderr
    assert "hint: pass --reference with the FP32 ONNX model" in result.stderr


def test_without_a_reference_the_source_is_built_again_in_fp32(package, tiny_dir, tmp_path):
    """A manifest that records its source's path (as older packages did): the FP32 reference is built again by
    edgeq.decoder (no optimum), and on the export's own held-back text it gives the export's accuracy back."""
    import json
    import shutil

    from edgeq.textdata import EVALUATION_FILE

    copy = tmp_path / package.path.name
    shutil.copytree(package.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["source"]["path"] = str(tiny_dir)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    acc = evaluate_package(copy, EVALUATION_FILE)
    at_export = manifest["accuracy"]
    assert acc.tokens == at_export["tokens"] and acc.top1_agreement == at_export["top1_agreement"]
    # the export's reference ran the same FP32 layers one at a time: the same numbers but for float32 summation order
    assert acc.ref_perplexity == pytest.approx(at_export["ref_perplexity"], rel=1e-5)
    assert acc.perplexity == pytest.approx(at_export["perplexity"], rel=1e-5)
