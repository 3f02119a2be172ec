"""``edgeq report`` on a tiny LLM package: accuracy from the manifest, decode/prefill speed through onnxruntime-genai,
decode bytes per token and the bandwidth ceiling (numbers measured, never asserted on: timings belong in bench/)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.pipeline import export_package
from edgeq.speed import onnx_decode_bytes

from recipes.test_causal_lm import llm_request


@pytest.fixture(scope="module")
def package(tiny_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("llm-report")
    return export_package(llm_request(tiny_dir, tmp / "out", max_ppl_increase=1.0, min_top1_agreement=0.0))


def test_report_on_an_llm_package(package, tmp_path):
    result = CliRunner().invoke(main, ["report", str(package.path), "-o", str(tmp_path), "--no-plots"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "report.json").read_text())
    row = data["rows"][0]
    assert row["kind"] == "causal-lm"
    assert row["accuracy"]["perplexity"] == package.manifest["accuracy"]["perplexity"]
    assert row["decode_bytes_per_token"] == onnx_decode_bytes(package.path / "model.onnx")
    # as run on x86 the tied FP16 table is also an FP32 copy for the head: 600 x 64 x 4 bytes more, one FP16 row
    # less than the whole table (measured 234640 against 157696 stored)
    assert row["decode_bytes_as_run"] - row["decode_bytes_per_token"] == pytest.approx(600 * 64 * (4 - 2), abs=256)
    assert row["threads"] >= 1
    assert row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0
    assert 0 < row["fraction_of_ceiling"]
    assert data["bandwidth"]["gbs"] > 0
    text = (tmp_path / "REPORT.md").read_text()
    assert "| decode tok/s |" in text and f"{row['accuracy']['perplexity']:.2f}" in text
