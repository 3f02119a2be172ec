"""edgeq.passes.fix_static_shapes: [batch, sequence] inputs become fixed; other dynamic dimensions are refused."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from edgeq.errors import UnsupportedModelError
from edgeq.passes.fix_static_shapes import FixStaticShapes


def model_with(input_shape, output_shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["out"], name="id")], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, input_shape)],
        [helper.make_tensor_value_info("out", TensorProto.INT64, output_shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def dims(vi) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim]


def test_batch_and_sequence_become_the_profile_values():
    result = FixStaticShapes(batch_size=1, seq_len=64)(model_with(["batch_size", "sequence_length"], ["batch_size", "sequence_length"]))
    assert result.modified and result.summary == "batch_size=1, sequence_length=64"
    assert dims(result.model.graph.input[0]) == [1, 64]
    assert dims(result.model.graph.output[0]) == [1, 64]


def test_static_model_is_unchanged():
    result = FixStaticShapes(1, 64)(model_with([1, 64], [1, 64]))
    assert not result.modified


def test_a_dynamic_dimension_that_is_not_batch_or_sequence_is_refused():
    with pytest.raises(UnsupportedModelError, match=r"input 'input_ids' of rank 3 has dynamic dimension\(s\) batch \(axis 0\), seq \(axis 1\), height \(axis 2\)") as exc:
        FixStaticShapes(1, 64)(model_with(["batch", "seq", "height"], ["batch", "seq", "height"]))
    assert "android-arm64" in exc.value.hint
    assert exc.value.exit_code == 2
