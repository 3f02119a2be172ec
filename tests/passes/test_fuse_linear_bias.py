"""edgeq.passes.fuse_linear_bias: a static int8 layer and its bias Add become one MatMulIntegerToFloat with the
bias, in packages. The reference is ONNX Runtime's own fusion of the unfused graph (QDQ -> MatMulIntegerToFloat,
then the Add): the fused node computes the same integer GEMM and the same float scale and bias per element, in an
order that may round the last bit differently (here by up to 2e-7 of max |Y|; MiniLM's package: equal to the bit
on 64 texts), so outputs agree to 1e-6 of max |Y|."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.passes.fuse_linear_bias import FuseIntegerLinearBias
from edgeq.passes.quantize_linear import QuantizeLinearLayers
from edgeq.policy import NodeDecision, PrecisionPlan
from edgeq.runtime import session
from edgeq.stages.calibrate import ActivationRange

K, N = 24, 8


def _model(bias_shape: tuple[int, ...] = (N,)) -> onnx.ModelProto:
    """X [1, 5, K] -> Y1 = X @ W + b (static int8), Y2 = X @ W2 (static, no bias), Y3 = X @ W3 + c (per token)."""
    rng = np.random.default_rng(5)
    nodes = [helper.make_node("MatMul", ["X", "W"], ["m1"], name="mm1"),
             helper.make_node("Add", ["b", "m1"], ["Y1"], name="add1"),
             helper.make_node("MatMul", ["X", "W2"], ["Y2"], name="mm2"),
             helper.make_node("MatMul", ["X", "W3"], ["m3"], name="mm3"),
             helper.make_node("Add", ["m3", "c"], ["Y3"], name="add3")]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), name)
             for name, s in (("W", (K, N)), ("W2", (K, N)), ("W3", (K, N)), ("b", bias_shape), ("c", (N,)))]
    outs = [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 5, N]) for y in ("Y1", "Y2", "Y3")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 5, K])], outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def _quantized(model: onnx.ModelProto) -> onnx.ModelProto:
    ds = [NodeDecision("mm1", "MatMul", "linear", "linear", "int8", "test"),
          NodeDecision("mm2", "MatMul", "linear", "linear", "int8", "test"),
          NodeDecision("mm3", "MatMul", "linear", "linear", "int8-per-token", "test")]
    return QuantizeLinearLayers(PrecisionPlan(tuple(ds)), {"X": ActivationRange(-4.0, 4.0)}, "uint8")(model).model


def test_a_static_layer_with_a_bias_becomes_one_node_with_the_same_outputs():
    q = _quantized(_model())
    result = FuseIntegerLinearBias()(q)
    assert result.modified and result.summary == "1 static int8 layers fused with their bias"
    onnx.checker.check_model(result.model, full_check=True)
    fused = [n for n in result.model.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(fused) == 1 and fused[0].output == ["Y1"] and fused[0].input[6] == "b"
    ops = [n.op_type for n in result.model.graph.node]
    assert ops.count("Add") == 1  # the per-token layer's bias stays: its row scales come after the GEMM
    assert ops.count("MatMul") == 2  # the static layer without a bias and the per-token one: left to ORT
    x = np.random.default_rng(1).uniform(-4, 4, (1, 5, K)).astype(np.float32)
    want = session(q, fuse_qdq=True).run(None, {"X": x})
    got = session(result.model, fuse_qdq=True).run(None, {"X": x})
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * np.abs(b).max())
    assert np.array_equal(got[1], want[1]) and np.array_equal(got[2], want[2])  # the layers it left


@pytest.mark.parametrize("bias_shape", [(1, 5, N), (1,)])
def test_an_add_that_is_not_a_bias_over_the_columns_is_left(bias_shape):
    result = FuseIntegerLinearBias()(_quantized(_model(bias_shape)))
    assert not result.modified and result.summary == "no static int8 layer with a bias"
