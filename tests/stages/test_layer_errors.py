"""edgeq.stages.layer_errors: the per-layer errors that rank promotions are the arithmetic the packages run.

Checked against the graphs themselves: a per-token layer written by QuantizeLinearLayers (run in ONNX Runtime,
unfused, as measurements run it) gives the output ``per_token_rows(x) @ Wq`` to float32 rounding, for each of the
three per-token forms (zero point per row, fixed, fixed with a floor); and the three errors come out in the order
the precisions imply on tokens with an outlier channel: weight-only < per-token < static.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.passes.per_token import TokenQuant
from edgeq.passes.quantize_linear import ActivationRange, QuantizeLinearLayers
from edgeq.policy import NodeDecision, PrecisionPlan
from edgeq.runtime import session
from edgeq.stages.layer_errors import LayerErrors, measure, per_token_rows
from edgeq.stages.smooth import quantize_columns

K, N, M = 24, 8, 50


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[:, 3] *= 25  # an outlier channel
    x[::7] *= 4  # and louder tokens
    return x, (rng.standard_normal((K, N)) * 0.2).astype(np.float32)


@pytest.mark.parametrize("tq", [TokenQuant(per_row=True), TokenQuant(131), TokenQuant(60, -30.0)])
def test_per_token_rows_is_what_the_pass_computes(tq):
    x, w = _data()
    g = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"], name="mm")], "one",
                          [helper.make_tensor_value_info("X", TensorProto.FLOAT, [M, K])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [M, N])],
                          [numpy_helper.from_array(w, "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    plan = PrecisionPlan((NodeDecision("mm", "MatMul", "linear", "linear", "int8-per-token", "test"),))
    out = session(QuantizeLinearLayers(plan, {}, "uint8", token_quant={"X": tq})(model).model).run(None, {"X": x})[0]
    want = per_token_rows(x.astype(np.float64), tq) @ quantize_columns(w.astype(np.float64))
    np.testing.assert_allclose(out, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_errors_are_ordered_as_the_precisions_and_promoted_picks_the_right_one():
    x, w = _data()
    e = measure(x, w, ActivationRange(float(x.min()), float(x.max())), TokenQuant(per_row=True))
    assert 0 < e.weight_only < e.per_token < e.static < 1
    assert e.promoted("int8-per-token") == e.per_token and e.promoted("int8-weight-only") == e.weight_only
    assert e.promoted("w8a16") == e.weight_only and e.promoted("fp32") == 0.0
    with pytest.raises(ValueError, match="int8"):
        LayerErrors(1, 1, 1).promoted("int8")
