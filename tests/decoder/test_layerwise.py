"""Layer by layer against the whole graph: the statistics, the reference and the quantized package that
edgeq.decoder.layerwise computes one layer at a time equal what the whole-graph tools (collect_activation_stats,
measure_int4, QuantizeInt4, the FP32 decoder's logits) compute on the full FP32 decoder of the same checkpoint.

Measured on the tiny Llama-3 (2 layers, hidden 64, untied head; tolerances ~10x that): sensitivities agree to
1.9e-8 relative (FP32 sums in another order: the whole graph fuses each residual Add into the next norm), the
reference log-probabilities to 3.3e-6; the two INT4 packages (FP32 compute) have the same codes, and logits
agree to 4.9e-7 of max |logit|, while either differs
from FP32 by 0.19-0.36 of max |logit|: the same quantized weights, not merely a similar model.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

from edgeq.decoder import layerwise as L
from edgeq.decoder.graph import embed, embedding_table, final_norm_weight, write_decoder
from edgeq.llm.activations import collect_activation_stats
from edgeq.llm.evaluate import log_softmax, window_logits
from edgeq.llm.int4 import QuantizeInt4, measure_int4
from edgeq.policy import Int4Rules, decide_int4
from edgeq.runtime import session

from .tiny import build

SETTING = "gptq+clip, block 32, asymmetric, accuracy_level 4"


@pytest.fixture(scope="module")
def case(tiny_checkpoints, tmp_path_factory):
    folder = tiny_checkpoints("llama3")  # untied head: the head is a planned linear layer too
    root = tmp_path_factory.mktemp("layerwise")
    spec, source, fp32 = build(folder, root / "fp32")
    rng = np.random.default_rng(0)
    cal, ev = rng.integers(3, spec.vocab, (4, 32)), rng.integers(3, spec.vocab, (3, 32))
    measured = L.measure(spec, source, cal, ev, context_length=64, block_size=32, symmetric=False, reference_dir=root / "ref")
    return spec, source, fp32, cal, ev, measured, root


def _graph_name(node: str) -> str:
    return f"/{node}/MatMul"


def test_sensitivities_equal_the_whole_graph_measurement(case):
    spec, _, fp32, cal, _, measured, _ = case
    model = onnx.load(str(fp32))
    whole = {f.node: f for f in measure_int4(model, collect_activation_stats(model, cal), 32, False).layers}
    for f in measured.facts.layers:
        w = whole[_graph_name(f.node)]
        assert (f.k, f.n) == (w.k, w.n), f.node
        assert f.sensitivity == pytest.approx(w.sensitivity, rel=2e-7), f.node
    assert len(measured.facts.layers) == len(whole) == 5 * spec.num_layers + 1


def test_reference_equals_the_fp32_decoder(case):
    _, _, fp32, _, ev, measured, _ = case
    sess = session(fp32)
    for i, ids in enumerate(ev):
        np.testing.assert_allclose(measured.reference.logprobs(i), log_softmax(window_logits(sess, ids)), atol=3e-5)


def test_the_layerwise_package_equals_the_whole_graph_pass(case):
    spec, source, fp32, cal, ev, measured, root = case
    rules = Int4Rules(setting=SETTING, promote=1.0, max_linear_bits=6.5)
    plan = {d.node: d for d in decide_int4(measured.facts, rules)}
    assert {d.bits for d in plan.values()} == {4, 8}  # K/V and promoted layers at 8 bits, the rest at 4
    # accuracy_level 0 (FP32 compute) on both: at level 4 the activations are rounded to int8 per block, and a
    # last-bit difference in a layer-1 scale (FP32 sums in another order) can flip one rounding: 0.05 of 6.9 in one
    # window, measured with onnxruntime 1.32
    settings = L.QuantSettings(accuracy_level=0)
    layers = L.quantized_layers(spec, source, embed(spec, source, cal), plan, settings, context_length=64)
    path = write_decoder(spec, root / "layerwise", embedding_table(source), layers, final_norm_weight(spec, source),
                         L.quantized_head(spec, source, measured, plan, settings), context_length=64)
    model = onnx.load(str(fp32))
    whole_plan = [dataclasses.replace(d, node=_graph_name(d.node)) for d in plan.values()]
    whole = QuantizeInt4(whole_plan, collect_activation_stats(model, cal), accuracy_level=0)(model).model
    quantized = [n for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == "MatMulNBits"]
    assert len(quantized) == sum(d.quantize for d in plan.values())
    a, b, f = session(path), session(whole), session(fp32)
    for ids in ev:
        got, want, ref = window_logits(a, ids), window_logits(b, ids), window_logits(f, ids)
        scale = np.abs(ref).max()
        assert np.abs(got - want).max() <= 5e-6 * scale
        assert np.abs(got - ref).max() >= 0.1 * scale  # INT4 is visible: the agreement above is not FP32's
