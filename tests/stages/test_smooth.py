"""edgeq.stages.smooth and its rewrite in QuantizeLinearLayers: per-channel smoothing of a static int8 input.

Data: tokens [M, K] with two outlier channels (x50), as LayerNorm outputs have, read by two layers (q and k share
their input). Static per-tensor int8 codes everything else on a few steps; smoothing moves the outliers' range into
the weights' rows. Checked: the choice lowers the sampled output error and divides the outlier channels most; the
rewritten graph is X * (1/t) -> one QuantizeLinear -> each layer's DequantizeLinear with W * t quantized, and ORT's
output is that arithmetic (float32 rounding) and nearer the float output than without smoothing.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.passes.quantize_linear import ActivationRange, QuantizeLinearLayers
from edgeq.policy import NodeDecision, PrecisionPlan
from edgeq.runtime import session
from edgeq.stages.smooth import choose, quantize_columns, quantize_rows

K, N, M = 32, 16, 400
OUTLIERS = (3, 17)


def _data(seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K))
    x[:, OUTLIERS] *= 50
    return x, [rng.standard_normal((K, N)) * 0.1 for _ in range(2)]


def _error(x, w, xq, wq) -> float:
    y = x @ w
    return float(np.sum((y - xq @ wq) ** 2) / np.sum(y ** 2))


def test_choose_smooths_the_outlier_channels_and_lowers_the_output_error():
    x, ws = _data()
    s = choose(x, np.abs(x).max(0), ws, 100.0)
    assert s is not None and s.error < s.error_unsmoothed / 4
    assert set(np.argsort(s.inv_scale)[:2]) == set(OUTLIERS)  # divided most
    assert s.inv_scale.dtype == np.float32 and s.inv_scale.shape == (K,)


def test_no_smoothing_when_every_channel_is_alike():
    """Every channel and every weight row with the same largest |value|: t is uniform for every alpha, so no
    smoothing lowers the error and none is chosen (one Mul saved)."""
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (M, K))
    w = rng.standard_normal((K, N))
    w /= np.abs(w).max(axis=1, keepdims=True)
    assert choose(x, np.ones(K), [w], 100.0) is None


def _model() -> onnx.ModelProto:
    _, (wq, wk) = _data()
    nodes = [helper.make_node("MatMul", ["X", "Wq"], ["Q"], name="q"),
             helper.make_node("MatMul", ["X", "Wk"], ["Kk"], name="k")]
    g = helper.make_graph(nodes, "qk", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [M, K])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, [M, N]) for o in ("Q", "Kk")],
                          [numpy_helper.from_array(wq.astype(np.float32), "Wq"),
                           numpy_helper.from_array(wk.astype(np.float32), "Wk")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_the_rewrite_is_the_smoothed_arithmetic_and_nearer_the_float_output():
    x, ws = _data()
    model = _model()
    plan = PrecisionPlan(tuple(NodeDecision(n, "MatMul", "linear", "linear", "int8", "test") for n in ("q", "k")))
    s = choose(x, np.abs(x).max(0), ws, 100.0)
    xs = x * s.inv_scale
    smoothed_range = ActivationRange(float(xs.min()), float(xs.max()))
    plain = QuantizeLinearLayers(plan, {"X": ActivationRange(float(x.min()), float(x.max()))}, "uint8")(model).model
    smooth = QuantizeLinearLayers(plan, {"X": ActivationRange(float(x.min()), float(x.max()))}, "uint8",
                                  smoothed={"X": (s.inv_scale, smoothed_range)})(model).model
    ops = [n.op_type for n in smooth.graph.node]
    assert ops.count("Mul") == 1 and ops.count("QuantizeLinear") == 1  # shared by both readers
    x32 = x.astype(np.float32)
    got, base = session(smooth).run(None, {"X": x32}), session(plain).run(None, {"X": x32})
    t = 1 / s.inv_scale.astype(np.float64)
    for y, yb, w in zip(got, base, ws):
        w32 = w.astype(np.float32).astype(np.float64)
        want = quantize_rows(x32 * s.inv_scale, smoothed_range.lo, smoothed_range.hi) @ quantize_columns(
            (w32 * t[:, None]).astype(np.float32).astype(np.float64))
        np.testing.assert_allclose(y, want, rtol=0, atol=2e-5 * np.abs(want).max())
        exact = x32.astype(np.float64) @ w32
        assert np.abs(y - exact).mean() < 0.5 * np.abs(yb - exact).mean()
