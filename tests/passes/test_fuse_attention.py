"""FuseEncoderAttention on the tiny BERT's export: one MultiHeadAttention per layer, the projections still linear
layers, outputs as the unfused graph's on a padded batch."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from edgeq.categories import classify
from edgeq.modelsource import inspect_model_dir
from edgeq.passes.fuse_attention import FUSED_OP, FuseEncoderAttention, parity
from edgeq.runtime import encode, session
from edgeq.stages.export import export
from edgeq.stages.optimize import optimize
from edgeq.textdata import EVALUATION_FILE, load_texts

pytestmark = pytest.mark.encoders  # the export runs optimum-onnx

# Measured on the tiny BERT: max |diff| 4.8e-7 over a padded batch of 16 (outputs ~1-4); MiniLM 3.9e-7 relative on
# 64 texts. The kernel computes the same float32 attention in another order (fused softmax, no -inf bias Add).
ATOL = 5e-6


@pytest.fixture(scope="module")
def exported(tiny_bert_dir, tmp_path_factory):
    return export(inspect_model_dir(tiny_bert_dir), tmp_path_factory.mktemp("fuse-attention"))


@pytest.fixture(scope="module")
def fused(exported):
    return FuseEncoderAttention()(onnx.load(str(exported.onnx_path)))


@pytest.fixture(scope="module")
def feeds(exported):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(exported.tokenizer_dir), local_files_only=True)
    feeds = encode(tokenizer, load_texts(EVALUATION_FILE).head(16), 128, list(exported.input_names))
    assert not feeds["attention_mask"].all()  # padded rows: the key padding mask is exercised
    return feeds


def test_one_multi_head_attention_per_layer(fused):
    assert fused.modified
    ops = Counter(n.op_type for n in fused.model.graph.node)
    assert ops[FUSED_OP] == 2  # the tiny BERT's 2 layers
    assert ops["Softmax"] == 0 and ops["Transpose"] == 0  # the heads' split and merge went into the kernel
    assert f"2 attention blocks -> {FUSED_OP}" in fused.summary


def test_projections_stay_linear_layers_and_their_biases_are_packed(exported, fused):
    """q/k/v each a MatMul on a constant weight (the policy plans them); their biases the node's bias input."""
    infos = classify(fused.model)
    assert Counter(i.category for i in infos.values())["linear"] == 12
    assert Counter(i.category for i in infos.values())["attention"] == 2
    raw = onnx.load(str(exported.onnx_path))
    consts = {i.name: onnx.numpy_helper.to_array(i) for i in raw.graph.initializer}
    consts.update({n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in raw.graph.node
                   if n.op_type == "Constant"})
    consts.update({n.output[0]: consts[n.input[0]] for n in raw.graph.node if n.op_type == "Identity"})  # shared
    biases = {n.name: next((consts[i] for i in n.input if i in consts and consts[i].ndim == 1), None)
              for n in raw.graph.node if n.op_type == "Add"}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in fused.model.graph.initializer}
    producer = {o: n for n in fused.model.graph.node for o in n.output}
    for layer, n in enumerate(n for n in fused.model.graph.node if n.op_type == FUSED_OP):
        projections = [producer[x] for x in n.input[:3]]
        assert [p.op_type for p in projections] == ["MatMul"] * 3
        assert all(infos[p.name].role == "attn_qkv" and p.input[1] in inits for p in projections)
        want = np.concatenate([biases[f"/encoder/layer.{layer}/attention/self/{w}/Add"] for w in ("query", "key",
                                                                                                  "value")])
        np.testing.assert_array_equal(inits[n.input[3]], want)


def test_outputs_match_the_unfused_export(exported, fused, feeds, tmp_path):
    path = tmp_path / "fused.onnx"
    onnx.save(fused.model, str(path))
    (want,) = session(exported.onnx_path).run(None, feeds)
    (got,) = session(path).run(None, {k: feeds[k] for k in exported.input_names})
    real = feeds["attention_mask"][..., None].astype(bool)  # padded positions' outputs are not read by pooling
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), rtol=0, atol=ATOL)


def test_a_graph_without_attention_is_left_alone():
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    result = FuseEncoderAttention()(model)
    assert not result.modified and result.model is not model
    assert [n.op_type for n in result.model.graph.node] == ["Relu"]


def test_optimize_stage_fuses_when_asked(exported, tmp_path):
    optimized = optimize(exported, tmp_path, fuse_attention=True)
    ops = Counter(n.op_type for n in optimized.load().graph.node)
    assert ops[FUSED_OP] == 2 and ops["Softmax"] == 0
    assert not list(tmp_path.glob("optimized.fused.onnx*"))
    assert optimized.fusion.startswith("2 attention blocks -> MultiHeadAttention")
    assert Counter(i.category for i in optimized.nodes.values())["linear"] == 12


def test_a_fusion_that_changes_the_outputs_is_not_kept(exported, monkeypatch):
    """The parity check guards against a matched pattern the kernel computes differently (a family's extra bias,
    say): here the fused graph's packed q/k/v bias is altered after the optimizer ran."""
    import onnxruntime.transformers.optimizer as opt

    real = opt.optimize_model

    def corrupted(*args, **kwargs):
        out = real(*args, **kwargs)
        bias = next(n.input[3] for n in out.model.graph.node if n.op_type == FUSED_OP)
        init = next(i for i in out.model.graph.initializer if i.name == bias)
        init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) + 1.0, bias))
        return out

    monkeypatch.setattr(opt, "optimize_model", corrupted)
    model = onnx.load(str(exported.onnx_path))
    result = FuseEncoderAttention()(model)
    assert not result.modified and "2 attention blocks matched, not fused: outputs off by" in result.summary
    assert Counter(n.op_type for n in result.model.graph.node)[FUSED_OP] == 0


def test_parity_is_float_rounding_on_the_tiny_bert(exported, fused):
    assert "outputs within" in fused.summary
    assert parity(onnx.load(str(exported.onnx_path)), fused.model) < 1e-5
