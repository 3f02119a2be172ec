"""edgeq.categories: classify() on a real optimum export of the tiny BERT, and the linear-role name table."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.categories import CATEGORIES, classify, linear_role
from edgeq.families import ROLES, linear_roles
from edgeq.modelsource import inspect_model_dir
from edgeq.stages.export import export
from edgeq.stages.optimize import optimize


@pytest.fixture(scope="module")
def optimized(tiny_bert_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("categories-work")
    return optimize(export(inspect_model_dir(tiny_bert_dir), work), work)


@pytest.fixture(scope="module")
def model(optimized) -> onnx.ModelProto:
    return optimized.load()


@pytest.fixture(scope="module")
def nodes(model):
    return classify(model)


def by_category(nodes, category):
    return [n for n in nodes.values() if n.category == category]


@pytest.mark.encoders
def test_every_node_is_classified_once_with_a_known_category(model, nodes):
    names = [n.name for n in model.graph.node]
    assert len(names) == len(set(names)) and all(names)
    assert list(nodes) == names
    for info in nodes.values():
        assert info.category in CATEGORIES
        assert (info.role != "") == (info.category == "linear")


@pytest.mark.encoders
def test_optimize_stores_the_same_classification(optimized, nodes):
    assert optimized.nodes == nodes


@pytest.mark.encoders
def test_three_embedding_gathers(model, nodes):
    emb = by_category(nodes, "embedding")
    assert sorted(n.name for n in emb) == [
        "/embeddings/position_embeddings/Gather",
        "/embeddings/token_type_embeddings/Gather",
        "/embeddings/word_embeddings/Gather",
    ]
    tables = {n.name: n.input[0] for n in model.graph.node if n.name in {e.name for e in emb}}
    assert set(tables.values()) == {"embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                                    "embeddings.token_type_embeddings.weight"}
    assert all(n.op_type == "Gather" for n in emb)


@pytest.mark.encoders
def test_shape_gathers_are_not_embeddings(model, nodes):
    shape_gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.name not in
                     {e.name for e in by_category(nodes, "embedding")}]
    assert shape_gathers, "the export has Gathers on shapes"
    assert all(nodes[n.name].category in ("other", "attention_mask") for n in shape_gathers)


@pytest.mark.encoders
def test_every_layernorm_is_norm(model, nodes):
    lns = [n.name for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert len(lns) == 5  # embeddings + 2 per layer
    assert {nodes[n].category for n in lns} == {"norm"}
    assert {n.name for n in by_category(nodes, "norm")} == set(lns)


@pytest.mark.encoders
def test_twelve_linear_layers_with_roles(nodes):
    linear = by_category(nodes, "linear")
    assert len(linear) == 12
    assert Counter(n.role for n in linear) == {"attn_qkv": 6, "attn_out": 2, "ffn_up": 2, "ffn_down": 2}
    assert all(n.op_type == "MatMul" for n in linear)
    for layer in (0, 1):
        p = f"/encoder/layer.{layer}"
        assert nodes[f"{p}/attention/self/query/MatMul"].role == "attn_qkv"
        assert nodes[f"{p}/attention/self/key/MatMul"].role == "attn_qkv"
        assert nodes[f"{p}/attention/self/value/MatMul"].role == "attn_qkv"
        assert nodes[f"{p}/attention/output/dense/MatMul"].role == "attn_out"
        assert nodes[f"{p}/intermediate/dense/MatMul"].role == "ffn_up"
        assert nodes[f"{p}/output/dense/MatMul"].role == "ffn_down"


@pytest.mark.encoders
def test_activation_matmuls_are_attention_matmul(model, nodes):
    inits = {i.name for i in model.graph.initializer}
    act = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] not in inits]
    assert len(act) == 4  # QK^T and PV in each layer
    assert all(nodes[n.name].category == "attention_matmul" for n in act)


@pytest.mark.encoders
def test_softmax_nodes(model, nodes):
    softmax = [n.name for n in model.graph.node if n.op_type == "Softmax"]
    assert len(softmax) == 2
    assert {n.name for n in by_category(nodes, "softmax")} == set(softmax)


@pytest.mark.encoders
def test_add_feeding_each_softmax_is_attention_mask(model, nodes):
    producer = {o: n for n in model.graph.node for o in n.output}
    softmax = [n for n in model.graph.node if n.op_type == "Softmax"]
    for s in softmax:
        add = producer[s.input[0]]
        assert add.op_type == "Add"
        assert nodes[add.name].category == "attention_mask", add.name


@pytest.mark.encoders
def test_mask_path_stops_at_the_add(model, nodes):
    """Nothing downstream of a mask Add (Softmax, the PV MatMul, ...) is on the mask path."""
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    mask_nodes = {n.name for n in by_category(nodes, "attention_mask")}
    for n in model.graph.node:
        if n.name not in mask_nodes:
            continue
        feeds_softmax = any(c.op_type == "Softmax" for o in n.output for c in consumers.get(o, []))
        if feeds_softmax:
            continue
        for o in n.output:  # every other mask-path node's consumers are on the path too
            for c in consumers.get(o, []):
                assert c.name in mask_nodes or nodes[c.name].category in ("norm", "embedding"), (n.name, c.name)
    # and the path starts at the attention_mask input
    assert any("attention_mask" in n.input for n in model.graph.node if n.name in mask_nodes)
    assert not any(nodes[n].op_type == "Softmax" for n in mask_nodes)


# --- linear_role --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, role",
    [
        # causal LMs (edgeq.decoder's names, MatMul or MatMulNBits)
        ("/model.layers.0.attn.qkv_proj/MatMulNBits", "attn_qkv"),
        ("/model.layers.11.attn.qkv_proj/MatMul", "attn_qkv"),
        ("/model.layers.0.attn.o_proj/MatMulNBits", "attn_out"),
        ("/model.layers.0.mlp.gate_proj/MatMulNBits", "ffn_up"),
        ("/model.layers.0.mlp.up_proj/MatMul", "ffn_up"),
        ("/model.layers.0.mlp.down_proj/MatMulNBits", "ffn_down"),
        ("/lm_head/MatMul", "lm_head"),
        # bert family
        ("/encoder/layer.3/attention/self/query/MatMul", "attn_qkv"),
        ("/encoder/layer.3/attention/output/dense/MatMul", "attn_out"),
        ("/encoder/layer.3/intermediate/dense/MatMul", "ffn_up"),
        ("/encoder/layer.3/output/dense/MatMul", "ffn_down"),
        ("/pooler/dense/Gemm", "pooler"),
        # distilbert
        ("/transformer/layer.0/attention/q_lin/MatMul", "attn_qkv"),
        ("/transformer/layer.0/attention/out_lin/MatMul", "attn_out"),
        ("/transformer/layer.0/ffn/lin1/MatMul", "ffn_up"),
        ("/transformer/layer.0/ffn/lin2/MatMul", "ffn_down"),
        # mpnet
        ("/encoder/layer.0/attention/attn/q/MatMul", "attn_qkv"),
        ("/encoder/layer.0/attention/attn/o/MatMul", "attn_out"),
        # nothing recognisable
        ("MatMul_17", "linear"),
        ("", "linear"),
    ],
)
def test_linear_role(name, role):
    assert linear_role(name) == role


def test_linear_roles_come_from_the_families_in_role_order():
    table = linear_roles()
    assert [r for r, _, _ in table] == sorted((r for r, _, _ in table), key=ROLES.index)  # attn_out before ffn_down
    assert {r for r, _, _ in table} == set(ROLES)
    assert all(families for _, _, families in table)


# --- classify on hand-built graphs ---------------------------------------------------------------------------------


def _graph(nodes, inits, inputs, outputs):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_gemm_with_constant_weight_is_linear_and_matmul_with_3d_constant_is_not():
    inits = [numpy_helper.from_array(np.zeros((4, 4), np.float32), "W2"),
             numpy_helper.from_array(np.zeros((2, 4, 4), np.float32), "W3")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    m = _graph([helper.make_node("Gemm", ["x", "W2"], ["y"], name="/pooler/dense/Gemm"),
                helper.make_node("MatMul", ["y", "W3"], ["z"], name="batched")], inits, [x], [y])
    out = classify(m)
    assert (out["/pooler/dense/Gemm"].category, out["/pooler/dense/Gemm"].role) == ("linear", "pooler")
    assert out["batched"].category == "attention_matmul"


def test_gather_from_int_table_is_not_an_embedding():
    inits = [numpy_helper.from_array(np.arange(12, dtype=np.int64).reshape(3, 4), "T")]
    i = helper.make_tensor_value_info("ids", TensorProto.INT64, [2])
    o = helper.make_tensor_value_info("y", TensorProto.INT64, None)
    m = _graph([helper.make_node("Gather", ["T", "ids"], ["y"], name="g")], inits, [i], [o])
    assert classify(m)["g"].category == "other"
