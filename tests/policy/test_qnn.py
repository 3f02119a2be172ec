"""edgeq.policy.qnn: 16-bit weights for the linear layers with the lowest 8-bit weight SQNR, decided before
write_qdq runs, which takes the promoted weights from the plan."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.policy.qnn import decide_qnn_precision, promoted_weights, promotion_steps
from edgeq.precision import Precision
from edgeq.profiles import load_profile
from edgeq.qnn.quantize import weight_sqnr

OUTLIERS = {"mm0": 1.0, "mm1": 300.0, "mm2": 10.0, "mm3": 30.0}  # one weight scaled by this: a lower 8-bit SQNR


@pytest.fixture(scope="module")
def model():
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i, (name, outlier) in enumerate(OUTLIERS.items()):
        w = rng.standard_normal((8, 8)).astype(np.float32)
        w[0, 0] *= outlier
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"W{i}"], [f"y{i}"], name=name))
        x = f"y{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def spec():
    return load_profile("android-qnn-htp").qnn


def test_the_k_lowest_sqnr_layers_get_16_bit_weights(model, spec):
    sqnr = weight_sqnr(model, spec.weight_bits)
    assert sorted(sqnr, key=lambda n: sqnr[n][1]) == ["mm1", "mm3", "mm2", "mm0"]  # more outlier, lower SQNR
    plan = decide_qnn_precision(model, sqnr, 2, spec, mask_bias_changed=False)
    by = plan.by_name()
    assert [by[n].precision for n in OUTLIERS] == [Precision.W8A16, Precision.W16A16, Precision.W8A16,
                                                   Precision.W16A16]
    assert by["mm1"].reason.startswith("sensitive: 8-bit per-tensor weight SQNR") and "rank 1 of 4" in by["mm1"].reason
    assert by["mm0"].sensitivity == pytest.approx(sqnr["mm0"][1])
    assert promoted_weights(plan, sqnr, spec) == ["W1", "W3"]  # lowest SQNR first, as write_qdq overrides them


def test_no_promotion_when_the_sensitive_width_is_not_wider(model, spec):
    narrow = dataclasses.replace(spec, sensitive_weight_bits=8)
    sqnr = weight_sqnr(model, 8)
    assert promotion_steps(4, narrow) == [0]
    assert promotion_steps(4, spec) == [0, 2, 4] and promotion_steps(13, spec)[-3:] == [10, 12, 13]
    plan = decide_qnn_precision(model, sqnr, 0, narrow, mask_bias_changed=False)
    assert promoted_weights(plan, sqnr, narrow) == []
