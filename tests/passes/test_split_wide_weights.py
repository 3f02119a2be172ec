"""edgeq.passes.split_wide_weights on QDQ models written by edgeq's own HTP quantizer (write_qdq), one linear layer
with a 16-bit weight (the profile's sensitive_weight_bits) and a bias. Tolerance: the split adds two roundings to the
layer's 16-bit output scale (each partial product is quantized, then their sum; the high one with twice the output's
step), so outputs may move by up to 2 output steps; asserted at 2.5."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.passes.split_wide_weights import SplitWideWeights
from edgeq.profiles import QNNSpec
from edgeq.qnn.quantize import write_qdq
from edgeq.runtime import session


def linear(path, op: str = "MatMul"):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    if op == "Gemm":  # 2-D input: Gemm(x, W, b)
        nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["h"], name="fc")]
        shape = [4, 16]
    else:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="fc"), helper.make_node("Add", ["m", "b"], ["h"], name="bias")]
        shape = [1, 4, 16]
    nodes.append(helper.make_node("Relu", ["h"], ["y"], name="act"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape[:-1] + [8])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path, shape


@pytest.fixture(params=["MatMul", "Gemm"])
def qdq16(request, tmp_path):
    src, shape = linear(tmp_path / "float.onnx", request.param)
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(8)]
    return write_qdq(src, tmp_path / "qdq.onnx", feeds, QNNSpec(), ["W"]), feeds


def inits(model) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def test_a_16_bit_weight_becomes_two_8_bit_planes_that_are_exactly_it(qdq16):
    path, _ = qdq16
    before = onnx.load(str(path))
    wide = [i.name for i in before.graph.initializer if i.data_type == TensorProto.INT16 and i.dims]
    assert len(wide) == 1  # the quantizer wrote the promoted weight as symmetric int16
    result = SplitWideWeights()(before)
    assert result.modified and "1 16-bit weights as two 8-bit planes: fc" in result.summary
    after = result.model
    onnx.checker.check_model(after)
    a, b = inits(after), inits(before)
    assert not any(i.data_type == TensorProto.INT16 for i in after.graph.initializer)
    hi, lo = a[f"{wide[0]}_hi"], a[f"{wide[0]}_lo"]
    assert hi.dtype == np.int8 and lo.dtype == np.uint8
    np.testing.assert_array_equal(256 * hi.astype(np.int32) + lo, b[wide[0]].astype(np.int32))
    scale = b["W_scale"]
    assert a[f"{wide[0]}_hi_scale"] == pytest.approx(256 * scale) and a[f"{wide[0]}_lo_scale"] == pytest.approx(scale)
    ops = [n.op_type for n in after.graph.node]
    assert ops.count(before.graph.node[[n.name for n in before.graph.node].index("fc")].op_type) == 2


def test_outputs_move_by_at_most_a_few_output_steps(qdq16):
    path, feeds = qdq16
    before = onnx.load(str(path))
    after = SplitWideWeights()(before).model
    fc = next(n for n in before.graph.node if n.name == "fc")
    q_out = next(n for n in before.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == fc.output[0])
    step = float(inits(before)[q_out.input[1]])
    old, new = session(before), session(after)
    for f in feeds:
        assert np.abs(old.run(None, f)[0] - new.run(None, f)[0]).max() <= 2.5 * step


def test_8_bit_weights_are_left_alone(tmp_path):
    src, shape = linear(tmp_path / "float.onnx")
    feeds = [{"x": np.ones(shape, np.float32)}]
    model = onnx.load(str(write_qdq(src, tmp_path / "qdq.onnx", feeds, QNNSpec(), [])))
    result = SplitWideWeights()(model)
    assert not result.modified and result.summary == "no 16-bit weight to split"
    assert result.model == model
