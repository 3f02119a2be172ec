"""edgeq.qnn.rules: graphs HTP cannot compile are refused before quantization, naming the node and why."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from edgeq.errors import UnsupportedModelError
from edgeq.qnn.rules import check_htp_graph, htp_problems


def graph(nodes, inputs, outputs, opset: int = 17) -> onnx.ModelProto:
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs), opset_imports=[helper.make_opsetid("", opset)])


def f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_static_elementwise_graph_has_no_problem():
    m = graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], [f32("x", [1, 8])], [f32("y", [1, 8])])
    assert htp_problems(m) == []
    check_htp_graph(m, "relu-model")  # does not raise


def test_if_node_is_refused_with_its_name():
    branch = lambda op: helper.make_graph([helper.make_node(op, ["x"], [f"{op}_out"])], op, [], [f32(f"{op}_out", [1, 8])])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    m = graph([helper.make_node("If", ["cond"], ["y"], name="branchy", then_branch=branch("Relu"),
                                else_branch=branch("Neg"))], [cond, f32("x", [1, 8])], [f32("y", [1, 8])])
    with pytest.raises(UnsupportedModelError, match=r"my-model cannot run on the QNN HTP backend: node 'branchy' is If: "
                                                    r"control flow") as exc:
        check_htp_graph(m, "my-model")
    assert exc.value.exit_code == 2 and "static shapes" in exc.value.hint


def test_data_dependent_shape_is_refused():
    m = graph([helper.make_node("NonZero", ["x"], ["idx"], name="nz")], [f32("x", [1, 8])],
              [helper.make_tensor_value_info("idx", TensorProto.INT64, None)])
    problems = htp_problems(m)
    assert "node 'nz' is NonZero: output shape depends on the data" in problems
    assert any(p.startswith("tensor 'idx' keeps dynamic dimension") for p in problems)


def test_dynamic_shape_left_after_fixing_is_refused():
    m = graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], [f32("x", ["batch", 8])], [f32("y", ["batch", 8])])
    with pytest.raises(UnsupportedModelError, match=r"tensor 'y' keeps dynamic dimension\(s\) batch"):
        check_htp_graph(m, "m")
