"""edgeq.passes.clamp_mask_bias: the mask path's float32-minimum constant becomes the profile's bias; nothing else."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.passes.clamp_mask_bias import ClampMaskBias
from edgeq.runtime import session

FMIN = float(np.finfo(np.float32).min)


def masked_scores(fill: float = FMIN, scores_const: float = FMIN) -> onnx.ModelProto:
    """scores [1, 4] + where(mask == 0, fill, 0) -> Softmax; ``big`` is a float-min constant off the mask path."""
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["mask_b"], to=TensorProto.BOOL, name="cast"),
        helper.make_node("Not", ["mask_b"], ["pad"], name="not"),
        helper.make_node("Where", ["pad", "fill", "zero"], ["bias"], name="where"),
        helper.make_node("Max", ["scores", "big"], ["clamped"], name="max"),
        helper.make_node("Add", ["clamped", "bias"], ["masked"], name="add"),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1, name="softmax"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 4]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 4])],
        [numpy_helper.from_array(np.array(fill, np.float32), "fill"),
         numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
         numpy_helper.from_array(np.array(scores_const, np.float32), "big")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def init(model, name) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))


def test_float_min_on_the_mask_path_becomes_the_bias_and_masking_still_works():
    model = masked_scores()
    result = ClampMaskBias(-100.0)(model)
    assert result.modified and "fill" in result.summary
    assert init(result.model, "fill") == np.float32(-100.0)
    assert init(result.model, "big") == np.float32(FMIN)  # not on the mask path: untouched
    assert init(model, "fill") == np.float32(FMIN)  # the input model is not mutated
    feeds = {"scores": np.array([[0.5, 1.0, -2.0, 3.0]], np.float32), "attention_mask": np.array([[1, 1, 0, 0]])}
    before, after = (session(m).run(None, feeds)[0] for m in (model, result.model))
    np.testing.assert_allclose(after, before, atol=1e-12)  # exp(-100) underflows like exp(-3.4e38)
    assert after[0, 2:].max() < 1e-40


def test_a_moderate_mask_bias_is_left_alone():
    result = ClampMaskBias(-100.0)(masked_scores(fill=-1e4))
    assert not result.modified
    assert init(result.model, "fill") == np.float32(-1e4)
