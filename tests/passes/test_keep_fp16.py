"""edgeq.passes.keep_fp16: FP16 embedding tables and LayerNormalization on the CPU execution provider.

Tolerance: FP16 keeps 11 significant bits (relative rounding 2**-11 ~ 4.9e-4) on the table, on the LayerNorm input
and on its scale/bias; a few such roundings stay well inside the 2e-3 asked for, measured as
max|out - ref| / max|ref| (element-wise relative error is meaningless for LayerNorm outputs near zero).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.passes.keep_fp16 import KeepFp16
from edgeq.policy import NodeDecision, PrecisionPlan
from edgeq.runtime import session

VOCAB, H = 50, 16


def _plan(**precisions: str) -> PrecisionPlan:
    return PrecisionPlan(tuple(NodeDecision(n, "", "", "", p, "test") for n, p in precisions.items()))


def _model(nodes, inits, outputs, extra_inputs=()) -> onnx.ModelProto:
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])
    shapes = {"sum": [5, H], "logits": [2, VOCAB]}
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, shapes.get(o, [2, 5, H])) for o in outputs]
    g = helper.make_graph(nodes, "emb", [ids, *extra_inputs], outs, initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    return m


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((VOCAB, H)).astype(np.float32),
            rng.uniform(0.5, 1.5, H).astype(np.float32),
            rng.uniform(-0.2, 0.2, H).astype(np.float32))


def gather_ln_model() -> onnx.ModelProto:
    table, scale, bias = _weights()
    return _model(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="gather"),
         helper.make_node("LayerNormalization", ["emb", "ln_scale", "ln_bias"], ["out"], name="ln", axis=-1,
                          epsilon=1e-5)],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(scale, "ln_scale"),
         numpy_helper.from_array(bias, "ln_bias")],
        ["out"],
    )


IDS = np.array([[0, 3, 7, 49, 12], [5, 5, 1, 2, 30]], np.int64)


def rel_err(out, ref) -> float:
    return float(np.abs(out.astype(np.float64) - ref).max() / np.abs(ref).max())


def dtypes(model) -> dict[str, int]:
    return {i.name: i.data_type for i in model.graph.initializer}


@pytest.fixture(scope="module")
def converted():
    model = gather_ln_model()
    return model, KeepFp16(_plan(gather="fp16", ln="fp16"))(model)


def test_tables_and_norm_parameters_become_fp16(converted):
    _, result = converted
    assert result.modified
    assert result.summary == "2 nodes kept in fp16"
    assert dtypes(result.model) == {"table": TensorProto.FLOAT16, "ln_scale": TensorProto.FLOAT16,
                                    "ln_bias": TensorProto.FLOAT16}
    onnx.checker.check_model(result.model, full_check=True)


def test_fp16_values_are_the_rounded_float_values(converted):
    model, result = converted
    before = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for i in result.model.graph.initializer:
        arr = numpy_helper.to_array(i)
        assert arr.dtype == np.float16
        np.testing.assert_array_equal(arr, before[i.name].astype(np.float16))


def test_graph_output_stays_float32_and_runs_on_cpu(converted):
    model, result = converted
    assert result.model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    sess = session(result.model)
    assert sess.get_providers() == ["CPUExecutionProvider"]
    out = sess.run(None, {"ids": IDS})[0]
    assert out.dtype == np.float32 and out.shape == (2, 5, H)
    ref = session(model).run(None, {"ids": IDS})[0]
    err = rel_err(out, ref)
    assert 0 < err <= 2e-3, err


def test_lookup_and_norm_are_wrapped_in_casts(converted):
    _, result = converted
    ops = [(n.op_type, n.name) for n in result.model.graph.node]
    assert ops == [("Gather", "gather"), ("Cast", "gather_to_fp32"), ("Cast", "ln_to_fp16"),
                   ("LayerNormalization", "ln"), ("Cast", "ln_to_fp32")]
    ln = next(n for n in result.model.graph.node if n.name == "ln")
    assert list(ln.output) == ["out_fp16"]
    assert result.model.graph.node[-1].output[0] == "out"


def test_input_model_is_not_mutated(converted):
    model, _ = converted
    assert model.SerializeToString() == gather_ln_model().SerializeToString()


def test_embedding_only(converted):
    model = gather_ln_model()
    result = KeepFp16(_plan(gather="fp16", ln="fp32"))(model)
    assert dtypes(result.model) == {"table": TensorProto.FLOAT16, "ln_scale": TensorProto.FLOAT,
                                    "ln_bias": TensorProto.FLOAT}
    out = session(result.model).run(None, {"ids": IDS})[0]
    assert rel_err(out, session(model).run(None, {"ids": IDS})[0]) <= 2e-3


def test_table_read_by_a_second_node_stays_float32():
    table, scale, bias = _weights()
    model = _model(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="gather"),
         helper.make_node("LayerNormalization", ["emb", "ln_scale", "ln_bias"], ["out"], name="ln", axis=-1),
         helper.make_node("Gather", ["table", "ids"], ["emb2"], name="gather2"),  # e.g. a tied output head
         helper.make_node("ReduceSum", ["emb2", "axis0"], ["sum"], name="sum", keepdims=0)],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(scale, "ln_scale"),
         numpy_helper.from_array(bias, "ln_bias"), numpy_helper.from_array(np.array([0], np.int64), "axis0")],
        ["out", "sum"],
    )
    result = KeepFp16(_plan(gather="fp16", ln="fp16"))(model)
    d = dtypes(result.model)
    assert d["table"] == TensorProto.FLOAT
    assert d["ln_scale"] == d["ln_bias"] == TensorProto.FLOAT16  # the norm is still converted
    gather = next(n for n in result.model.graph.node if n.name == "gather")
    assert gather.output[0] == "emb"  # untouched: no Cast after it
    assert sum(1 for i in result.model.graph.initializer if i.name.startswith("table")) == 1
    ref = session(model).run(None, {"ids": IDS})
    out = session(result.model).run(None, {"ids": IDS})
    np.testing.assert_array_equal(out[1], ref[1])
    assert rel_err(out[0], ref[0]) <= 2e-3


def test_table_read_by_two_fp16_gathers_is_one_fp16_copy():
    table, _, _ = _weights()
    model = _model(
        [helper.make_node("Gather", ["table", "ids"], ["a"], name="g1"),
         helper.make_node("Gather", ["table", "ids"], ["b"], name="g2")],
        [numpy_helper.from_array(table, "table")], ["a", "b"],
    )
    result = KeepFp16(_plan(g1="fp16", g2="fp16"))(model)
    assert result.modified is True
    assert dtypes(result.model) == {"table": TensorProto.FLOAT16}
    out, ref = session(result.model).run(None, {"ids": IDS}), session(model).run(None, {"ids": IDS})
    assert out[0].dtype == np.float32 and rel_err(out[0], ref[0]) <= 2e-3 and rel_err(out[1], ref[1]) <= 2e-3


def test_table_also_read_in_fp32_stays_float32():
    table, _, _ = _weights()
    model = _model(
        [helper.make_node("Gather", ["table", "ids"], ["a"], name="g1"),
         helper.make_node("Gather", ["table", "ids"], ["b"], name="g2")],
        [numpy_helper.from_array(table, "table")], ["a", "b"],
    )
    result = KeepFp16(_plan(g1="fp16", g2="fp32"))(model)
    assert result.modified is False
    assert dtypes(result.model) == {"table": TensorProto.FLOAT}


def test_tied_head_reads_the_fp16_table_through_its_transpose():
    """Gather(table) and MatMul(x, Transpose(table)), all planned FP16: one FP16 table, logits still float32."""
    table, _, _ = _weights()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, table.shape[1]])
    model = _model(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="gather"),
         helper.make_node("Transpose", ["table"], ["table_t"], name="t", perm=[1, 0]),
         helper.make_node("MatMul", ["x", "table_t"], ["logits"], name="head")],
        [numpy_helper.from_array(table, "table")], ["emb", "logits"], extra_inputs=[x],
    )
    result = KeepFp16(_plan(gather="fp16", t="fp16", head="fp16"))(model)
    assert dtypes(result.model) == {"table": TensorProto.FLOAT16}
    xs = np.random.default_rng(1).standard_normal((2, table.shape[1])).astype(np.float32)
    out = session(result.model).run(None, {"ids": IDS, "x": xs})
    ref = session(model).run(None, {"ids": IDS, "x": xs})
    assert out[1].dtype == np.float32
    # FP16 table and activations: ~1e-3 relative per product, accumulated in float on the CPU EP
    assert rel_err(out[1], ref[1]) <= 5e-3


def test_norm_parameters_shared_by_fp16_norms_convert_in_place():
    """ORT's basic optimizer merges identical initializers (on a fresh random BERT every LayerNorm reads the same
    scale and bias): when only FP16 norms read them, they become FP16 once, under the same name."""
    table, scale, bias = _weights()
    model = _model(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="gather"),
         helper.make_node("LayerNormalization", ["emb", "s", "b"], ["h"], name="ln1", axis=-1),
         helper.make_node("LayerNormalization", ["h", "s", "b"], ["out"], name="ln2", axis=-1)],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(scale, "s"),
         numpy_helper.from_array(bias, "b")],
        ["out"],
    )
    result = KeepFp16(_plan(gather="fp16", ln1="fp16", ln2="fp16"))(model)
    assert dtypes(result.model) == {"table": TensorProto.FLOAT16, "s": TensorProto.FLOAT16, "b": TensorProto.FLOAT16}
    assert rel_err(session(result.model).run(None, {"ids": IDS})[0],
                   session(model).run(None, {"ids": IDS})[0]) <= 2e-3


def test_norm_parameter_also_read_in_fp32_gets_an_fp16_copy():
    """A bias the LayerNorm shares with an FP32 Add: the Add keeps the FP32 tensor, the norm reads an FP16 copy."""
    table, scale, bias = _weights()
    model = _model(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="gather"),
         helper.make_node("LayerNormalization", ["emb", "s", "b"], ["h"], name="ln", axis=-1),
         helper.make_node("Add", ["h", "b"], ["out"], name="add")],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(scale, "s"),
         numpy_helper.from_array(bias, "b")],
        ["out"],
    )
    result = KeepFp16(_plan(gather="fp16", ln="fp16", add="fp32"))(model)
    assert dtypes(result.model) == {"table": TensorProto.FLOAT16, "s": TensorProto.FLOAT16, "b": TensorProto.FLOAT,
                                    "b_fp16": TensorProto.FLOAT16}
    assert rel_err(session(result.model).run(None, {"ids": IDS})[0],
                   session(model).run(None, {"ids": IDS})[0]) <= 2e-3


def test_nothing_planned_returns_unmodified():
    model = gather_ln_model()
    result = KeepFp16(_plan(gather="fp32", ln="int8"))(model)
    assert result.modified is False
    assert result.model.SerializeToString() == model.SerializeToString()


def test_norm_with_non_initializer_scale_keeps_a_valid_graph():
    table, scale, bias = _weights()
    model = _model(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="gather"),
         helper.make_node("Constant", [], ["s"], name="const_s", value=numpy_helper.from_array(scale, "s")),
         helper.make_node("LayerNormalization", ["emb", "s", "ln_bias"], ["out"], name="ln", axis=-1)],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(bias, "ln_bias")],
        ["out"],
    )
    result = KeepFp16(_plan(gather="fp16", ln="fp16"))(model)
    onnx.checker.check_model(result.model, full_check=True)
    out = session(result.model).run(None, {"ids": IDS})[0]
    assert rel_err(out, session(model).run(None, {"ids": IDS})[0]) <= 2e-3
