"""edgeq.passes.fold_shapes: the shape arithmetic of an attention layer with dynamic batch and length folded.

The graph is what a transformers export writes per layer: the head split target [B, S, heads, d] from Shape/Gather/
Unsqueeze/Concat of the input, the merge target [B, S, H] back, and the softmax scale 1/sqrt(d) from the head size
(Shape, Slice, Cast, Sqrt, Div). After the pass the scale is an initializer and the Reshape targets are constants
with 0 for the copied dimensions; the outputs are the same to the bit for other batch and length sizes.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.passes.fold_shapes import FoldShapeArithmetic
from edgeq.runtime import session

H, HEADS = 8, 2


def _attention_plumbing() -> onnx.ModelProto:
    c = {"i0": np.array(0, np.int64), "i1": np.array(1, np.int64), "ax0": np.array([0], np.int64),
         "heads": np.array([HEADS], np.int64), "d": np.array([H // HEADS], np.int64), "h": np.array([H], np.int64),
         "m1": np.array([-1], np.int64), "big": np.array([2 ** 62], np.int64), "one": np.array(1.0, np.float32)}
    n = helper.make_node
    nodes = [
        n("Shape", ["X"], ["shape"]), n("Gather", ["shape", "i0"], ["b"], axis=0),
        n("Gather", ["shape", "i1"], ["s"], axis=0),
        n("Unsqueeze", ["b", "ax0"], ["b1"]), n("Unsqueeze", ["s", "ax0"], ["s1"]),
        n("Concat", ["b1", "s1", "heads", "d"], ["split"], axis=0),
        n("Concat", ["b1", "s1", "h"], ["merge"], axis=0),
        n("Reshape", ["X", "split"], ["x4"]), n("Transpose", ["x4"], ["xt"], perm=[0, 2, 1, 3]),
        n("Shape", ["xt"], ["shape4"]), n("Slice", ["shape4", "m1", "big"], ["dlast"]),
        n("Cast", ["dlast"], ["df"], to=TensorProto.FLOAT), n("Sqrt", ["df"], ["sq"]),
        n("Div", ["one", "sq"], ["scale"]),
        n("Mul", ["xt", "scale"], ["xs"]), n("Transpose", ["xs"], ["xb"], perm=[0, 2, 1, 3]),
        n("Reshape", ["xb", "merge"], ["Y"]),
    ]
    g = helper.make_graph(nodes, "plumbing", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["B", "S", H])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["B", "S", H])],
                          [numpy_helper.from_array(v, k) for k, v in c.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_shape_arithmetic_is_folded_and_outputs_are_bit_identical():
    model = _attention_plumbing()
    result = FoldShapeArithmetic()(model)
    assert result.modified
    onnx.checker.check_model(result.model, full_check=True)
    ops = [n.op_type for n in result.model.graph.node]
    assert ops == ["Reshape", "Transpose", "Mul", "Transpose", "Reshape"]
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    targets = [inits[n.input[1]].tolist() for n in result.model.graph.node if n.op_type == "Reshape"]
    assert targets == [[0, 0, HEADS, H // HEADS], [0, 0, H]]
    rng = np.random.default_rng(0)
    for b, s in ((1, 1), (1, 26), (4, 9)):
        x = rng.standard_normal((b, s, H)).astype(np.float32)
        want = session(model).run(None, {"X": x})[0]
        assert np.array_equal(session(result.model).run(None, {"X": x})[0], want)


def test_a_target_that_is_no_copied_dimension_is_kept():
    """[B * S, H]: its first entry varies with the sizes and is not the input's dimension at that index."""
    n = helper.make_node
    nodes = [n("Shape", ["X"], ["shape"]), n("Slice", ["shape", "z", "two"], ["bs"]),
             n("ReduceProd", ["bs"], ["m"], keepdims=1), n("Concat", ["m", "h"], ["t"], axis=0),
             n("Reshape", ["X", "t"], ["Y"])]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "z"),
             numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(np.array([H], np.int64), "h")]
    g = helper.make_graph(nodes, "flat", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["B", "S", H])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, H])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    result = FoldShapeArithmetic()(model)
    assert not result.modified
    assert [n.op_type for n in result.model.graph.node] == [n.op_type for n in nodes]


def test_a_graph_without_shape_ops_is_left_alone():
    g = helper.make_graph([helper.make_node("Relu", ["X"], ["Y"])], "relu",
                          [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["B", H])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["B", H])])
    result = FoldShapeArithmetic()(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    assert not result.modified and result.summary == "no shape arithmetic"
