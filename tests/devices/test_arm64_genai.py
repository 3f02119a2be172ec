"""LLM packages on arm64: PyPI's aarch64 onnxruntime-genai under qemu decodes a tiny Llama package greedily and must
give exactly the tokens x86 stored. Nothing is mocked; the wheel is installed beside the arm64 runtime on first use.
Greedy tokens are compared exactly: a random tiny model has no near-ties to flip at 16 tokens (measured: equal)."""

from __future__ import annotations

import json

import pytest

from edgeq.devices.arm64_genai import ensure_genai, greedy_tokens_on_arm64
from edgeq.pipeline import export_package
from edgeq.stages.verify import verify
from recipes.test_causal_lm import llm_request
from llm.tiny_llama import tiny_llama

device = pytest.mark.device


@pytest.fixture(scope="module")
def llm_package(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("arm64-llm")
    return export_package(llm_request(tiny_llama(tmp / "tiny-llama"), tmp / "out", max_ppl_increase=1.0,
                                      min_top1_agreement=0.0)).path


@pytest.fixture(scope="module")
def int8_table_package(tmp_path_factory):
    """The 8-bit table a tied head shares (GatherBlockQuantized and an 8-bit MatMulNBits on the same codes)."""
    tmp = tmp_path_factory.mktemp("arm64-llm-int8-table")
    return export_package(llm_request(tiny_llama(tmp / "tiny-llama"), tmp / "out", max_ppl_increase=1.0,
                                      min_top1_agreement=0.0, embedding_precision="int8",
                                      lm_head_precision="int8")).path


@device
def test_genai_wheel_is_installed_beside_the_runtime_once(arm64_runtime):
    site = ensure_genai(arm64_runtime)
    assert site.parent == arm64_runtime.root and (site / "onnxruntime_genai").is_dir()
    assert ensure_genai(arm64_runtime) == site


@device
@pytest.mark.parametrize("package", ["llm_package", "int8_table_package"])
def test_greedy_tokens_on_arm64_equal_the_x86_reference(arm64_runtime, request, package):
    """Also for the 8-bit table: GatherBlockQuantized is in the aarch64 build and reads the head's codes."""
    path = request.getfixturevalue(package)
    v = json.loads((path / "manifest.json").read_text())["verification"]
    tokens, info = greedy_tokens_on_arm64(arm64_runtime, path, v["prompt_ids"], len(v["greedy_tokens"]))
    assert info["machine"] == "aarch64"
    assert tokens == v["greedy_tokens"]


@device
def test_verify_on_arm64_passes_for_an_llm_package(llm_package):
    report = verify(llm_package, "arm64")
    assert report.ok, report.checks
    checks = {name: detail for name, _, detail in report.checks}
    assert "aarch64" in checks["load and generate"]
    assert checks["greedy tokens match reference"].startswith("16 greedy tokens equal")

