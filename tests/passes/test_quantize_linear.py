"""edgeq.passes.quantize_linear: weight/activation quantization maths and the QDQ rewrite, run in ONNX Runtime.

Error bound used for the rewritten MatMul (per output element n, X one row of the input, W' the dequantized
weight, sx the activation scale and sw[n] the weight scale of output channel n):

    Y' - Y = (X' - X) @ W' + X @ (W' - W),   |X' - X| <= sx / 2,   |W' - W| <= sw[n] / 2
    => |Y'[n] - Y[n]| <= sx / 2 * sum_k |W'[k, n]| + sw[n] / 2 * sum_k |X[k]|

plus float32 rounding of the reference and of ORT's kernel, allowed as 1e-5 * (|X| @ |W|)[n] + 1e-6.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.errors import PassError
from edgeq.passes.base import run_passes
from edgeq.passes.quantize_linear import (
    ACTIVATION_TYPES,
    ActivationRange,
    QuantizeLinearLayers,
    activation_qparams,
    quantize_weight,
)
from edgeq.policy import NodeDecision, PrecisionPlan
from edgeq.runtime import session

K, N = 16, 8



# --- quantize_weight -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis, shape", [(1, (16, 8)), (0, (8, 16))])
def test_quantize_weight_per_channel_error_bound(axis, shape):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3.0, size=shape[axis]).reshape(
        [-1 if a == axis else 1 for a in range(2)])).astype(np.float32)
    q, scale = quantize_weight(w, axis, per_channel=True)
    assert q.dtype == np.int8 and q.shape == w.shape
    assert scale.dtype == np.float32 and scale.shape == (shape[axis],)
    assert q.min() >= -127 and q.max() <= 127  # symmetric: -128 is never used
    s = np.expand_dims(scale, 1 - axis)
    err = np.abs(w - q.astype(np.float32) * s)
    assert np.all(err <= s / 2 * (1 + 1e-6)), (err / s).max()
    # each channel uses the full range: its largest |w| maps to +-127
    assert np.all(np.abs(q).max(axis=1 - axis) == 127)
    np.testing.assert_allclose(scale, np.abs(w).max(axis=1 - axis) / 127, rtol=1e-6)


def test_quantize_weight_is_symmetric():
    w = np.array([[1.0, -2.0], [-1.0, 2.0]], np.float32)
    q, scale = quantize_weight(w, 1, per_channel=True)
    np.testing.assert_array_equal(q, [[127, -127], [-127, 127]])
    np.testing.assert_allclose(scale, [1 / 127, 2 / 127])


def test_quantize_weight_per_tensor():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    q, scale = quantize_weight(w, 1, per_channel=False)
    assert scale.shape == ()
    assert scale == pytest.approx(np.abs(w).max() / 127, rel=1e-6)
    assert np.all(np.abs(w - q * scale) <= scale / 2 * (1 + 1e-6))
    assert np.abs(q).max() == 127


def test_quantize_weight_zero_channel_gets_scale_one():
    w = np.zeros((4, 3), np.float32)
    w[:, 1] = [0.5, -0.25, 0.0, 1.0]
    q, scale = quantize_weight(w, 1, per_channel=True)
    assert scale[0] == 1.0 and scale[2] == 1.0
    assert np.all(q[:, [0, 2]] == 0)
    assert np.all(np.isfinite(scale)) and np.all(scale > 0)
    np.testing.assert_allclose(q[:, 1] * scale[1], w[:, 1], atol=scale[1] / 2)


def test_quantize_weight_all_zero_per_tensor():
    q, scale = quantize_weight(np.zeros((3, 3), np.float32), 1, per_channel=False)
    assert scale == 1.0 and np.all(q == 0)


# --- activation_qparams --------------------------------------------------------------------------------------------


def _q(x, scale, zp, act_type):
    _, qmin, qmax, _ = ACTIVATION_TYPES[act_type]
    return np.clip(np.round(np.asarray(x, np.float64) / scale) + int(zp), qmin, qmax)


@pytest.mark.parametrize("act_type", list(ACTIVATION_TYPES))
@pytest.mark.parametrize("lo, hi", [(-1.5, 4.0), (-10.0, 0.3), (-0.001, 0.002), (-3.0, 3.0)])
def test_activation_qparams_maps_range_to_the_ends(act_type, lo, hi):
    dtype, qmin, qmax, _ = ACTIVATION_TYPES[act_type]
    scale, zp = activation_qparams(ActivationRange(lo, hi), act_type)
    assert scale.dtype == np.float32 and scale.shape == ()
    assert zp.dtype == dtype and zp.shape == ()
    assert scale == pytest.approx((hi - lo) / (qmax - qmin), rel=1e-6)
    assert abs(_q(lo, scale, zp, act_type) - qmin) <= 1
    assert abs(_q(hi, scale, zp, act_type) - qmax) <= 1
    assert _q(0.0, scale, zp, act_type) == zp  # zero is exact (padding, ReLU zeros)


@pytest.mark.parametrize("act_type", list(ACTIVATION_TYPES))
def test_activation_qparams_range_always_includes_zero(act_type):
    _, qmin, qmax, _ = ACTIVATION_TYPES[act_type]
    scale, zp = activation_qparams(ActivationRange(0.5, 3.0), act_type)  # all positive -> [0, 3]
    assert int(zp) == qmin
    assert scale == pytest.approx(3.0 / (qmax - qmin), rel=1e-6)
    scale, zp = activation_qparams(ActivationRange(-3.0, -0.5), act_type)  # all negative -> [-3, 0]
    assert int(zp) == qmax


def test_activation_qparams_degenerate_range_has_positive_scale():
    scale, zp = activation_qparams(ActivationRange(0.0, 0.0), "uint8")
    assert scale > 0 and int(zp) == 0


# --- the pass on a tiny graph --------------------------------------------------------------------------------------


def _tiny_model(gemm: bool = False) -> onnx.ModelProto:
    """X[1,4,16] -> mm1 = X @ W ; Z = Tanh(X) -> mm2 = Z @ W (the same W). With gemm=True, a 2-D Gemm with
    transB=1 and W stored [N, K] instead."""
    rng = np.random.default_rng(42)
    w = (rng.standard_normal((K, N)) * np.linspace(0.05, 2.0, N)).astype(np.float32)
    if gemm:
        x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [4, K])
        nodes = [helper.make_node("Gemm", ["X", "W"], ["Y1"], name="mm1", transB=1),
                 helper.make_node("Tanh", ["X"], ["Z"], name="tanh"),
                 helper.make_node("Gemm", ["Z", "W"], ["Y2"], name="mm2", transB=1)]
        w = np.ascontiguousarray(w.T)
        out_shape = [4, N]
    else:
        x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4, K])
        nodes = [helper.make_node("MatMul", ["X", "W"], ["Y1"], name="mm1"),
                 helper.make_node("Tanh", ["X"], ["Z"], name="tanh"),
                 helper.make_node("MatMul", ["Z", "W"], ["Y2"], name="mm2")]
        out_shape = [1, 4, N]
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, out_shape) for n in ("Y1", "Y2")]
    g = helper.make_graph(nodes, "tiny", [x], outs, initializer=[numpy_helper.from_array(w, "W")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m, full_check=True)
    return m


def _data(gemm: bool = False) -> np.ndarray:
    x = np.random.default_rng(3).standard_normal((1, 4, K)).astype(np.float32) * 2.0
    return x[0] if gemm else x


def _plan(precision: str, names=("mm1", "mm2"), op="MatMul") -> PrecisionPlan:
    ds = [NodeDecision(n, op, "linear", "linear", precision if n in names else "fp32", "test") for n in ("mm1", "mm2")]
    return PrecisionPlan(tuple(ds) + (NodeDecision("tanh", "Tanh", "other", "", "fp32", "test"),))


def _ranges(x: np.ndarray) -> dict[str, ActivationRange]:
    z = np.tanh(x)
    return {"X": ActivationRange(float(x.min()), float(x.max())), "Z": ActivationRange(float(z.min()), float(z.max()))}


def _run(model, x):
    return session(model).run(None, {"X": x})


def _inits(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _bound(x2d, w_deq, sx, sw, w):
    """Per-element bound from the module docstring; x2d [M, K], w_deq/w [K, N], sw [N]."""
    ax = np.abs(x2d.astype(np.float64))
    return sx / 2 * np.abs(w_deq).sum(0) + (sw / 2) * ax.sum(1, keepdims=True) + 1e-5 * ax @ np.abs(w) + 1e-6


@pytest.fixture(scope="module")
def int8_result():
    model, x = _tiny_model(), _data()
    result = QuantizeLinearLayers(_plan("int8"), _ranges(x), "uint8", per_channel=True)(model)
    return model, x, result


def test_int8_matches_float_within_the_derived_bound(int8_result):
    model, x, result = int8_result
    assert result.modified
    onnx.checker.check_model(result.model, full_check=True)
    ref = _run(model, x)
    out = _run(result.model, x)
    inits = _inits(result.model)
    w = numpy_helper.to_array(model.graph.initializer[0])
    sw = inits["W_w8_scale"]
    w_deq = inits["W_w8"].astype(np.float64) * sw
    for y_ref, y_out, tensor in zip(ref, out, ("X", "Z")):
        a = x if tensor == "X" else np.tanh(x)
        sx = float(inits[f"{tensor}_uint8_scale"])
        bound = _bound(a.reshape(-1, K), w_deq, sx, sw, w)
        err = np.abs(y_out - y_ref).reshape(-1, N)
        assert np.all(err <= bound), (err / bound).max()
        assert err.max() > 0  # it really is quantized


def test_int8_output_equals_the_qdq_arithmetic(int8_result):
    """ORT's result equals dequant(quant(X)) @ dequant(Wq) computed in numpy, to float32 rounding."""
    model, x, result = int8_result
    inits = _inits(result.model)
    w_deq = inits["W_w8"].astype(np.float64) * inits["W_w8_scale"]
    out = _run(result.model, x)
    for y_out, tensor in zip(out, ("X", "Z")):
        a = x if tensor == "X" else np.tanh(x)
        s, zp = float(inits[f"{tensor}_uint8_scale"]), int(inits[f"{tensor}_uint8_zp"])
        a_deq = (np.clip(np.round(a / s) + zp, 0, 255) - zp) * s
        np.testing.assert_allclose(y_out, a_deq @ w_deq, rtol=1e-4, atol=1e-4)


def test_shared_weight_is_quantized_once_and_float_weight_removed(int8_result):
    model, _, result = int8_result
    inits = {i.name: i for i in result.model.graph.initializer}
    int8_weights = [i for i in inits.values() if i.data_type == TensorProto.INT8 and list(i.dims) == [K, N]]
    assert [i.name for i in int8_weights] == ["W_w8"]
    assert "W" not in inits
    assert not any(i.data_type == TensorProto.FLOAT and list(i.dims) == [K, N] for i in inits.values())
    dq = [n for n in result.model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "W_w8"]
    assert len(dq) == 2  # one DQ per consumer, one stored tensor
    assert all(helper.get_attribute_value(a) == 1 for n in dq for a in n.attribute if a.name == "axis")
    mm = {n.name: n for n in result.model.graph.node}
    assert {mm["mm1"].input[1], mm["mm2"].input[1]} == {d.output[0] for d in dq}
    assert inits["W_w8_scale"].dims == [N] and inits["W_w8_zp"].data_type == TensorProto.INT8


def test_int8_activations_are_quantized_once_per_tensor(int8_result):
    _, _, result = int8_result
    q = [n for n in result.model.graph.node if n.op_type == "QuantizeLinear"]
    assert sorted(n.input[0] for n in q) == ["X", "Z"]
    assert all(n.domain == "" for n in q)
    zp = {i.name: i for i in result.model.graph.initializer if i.name.endswith("_uint8_zp")}
    assert {i.data_type for i in zp.values()} == {TensorProto.UINT8}


def test_input_model_is_not_mutated(int8_result):
    model, _, _ = int8_result
    assert model.SerializeToString() == _tiny_model().SerializeToString()


def test_weight_only_adds_no_activation_quantize():
    model, x = _tiny_model(), _data()
    result = QuantizeLinearLayers(_plan("int8-weight-only"), {}, "uint8")(model)  # no ranges needed
    assert result.modified
    ops = [n.op_type for n in result.model.graph.node]
    assert "QuantizeLinear" not in ops
    assert ops.count("DequantizeLinear") == 2
    mm = {n.name: n for n in result.model.graph.node}
    assert mm["mm1"].input[0] == "X" and mm["mm2"].input[0] == "Z"
    inits = _inits(result.model)
    sw = inits["W_w8_scale"]
    w = numpy_helper.to_array(model.graph.initializer[0])
    for y_ref, y_out, a in zip(_run(model, x), _run(result.model, x), (x, np.tanh(x))):
        bound = _bound(a.reshape(-1, K), w, 0.0, sw, w)
        assert np.all(np.abs(y_out - y_ref).reshape(-1, N) <= bound)


def test_only_planned_nodes_are_rewritten_and_shared_float_weight_is_kept():
    model, x = _tiny_model(), _data()
    result = QuantizeLinearLayers(_plan("int8", names=("mm1",)), _ranges(x), "uint8")(model)
    mm = {n.name: n for n in result.model.graph.node}
    assert mm["mm2"].input == ["Z", "W"]
    names = {i.name for i in result.model.graph.initializer}
    assert {"W", "W_w8"} <= names  # mm2 still reads the float W
    assert [n.input[0] for n in result.model.graph.node if n.op_type == "QuantizeLinear"] == ["X"]
    ref, out = _run(model, x), _run(result.model, x)
    np.testing.assert_array_equal(out[1], ref[1])


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_nothing_planned_returns_unmodified(precision):
    model = _tiny_model()
    result = QuantizeLinearLayers(_plan(precision), {}, "uint8")(model)
    assert result.modified is False
    assert result.model.SerializeToString() == model.SerializeToString()


def test_empty_plan_returns_unmodified():
    model = _tiny_model()
    assert QuantizeLinearLayers(PrecisionPlan(()), {}, "uint8")(model).modified is False


def test_gemm_trans_b_is_quantized_per_output_row():
    model, x = _tiny_model(gemm=True), _data(gemm=True)
    result = QuantizeLinearLayers(_plan("int8", op="Gemm"), _ranges(x), "int8")(model)
    onnx.checker.check_model(result.model, full_check=True)
    inits = _inits(result.model)
    assert inits["W_w8"].shape == (N, K) and inits["W_w8_scale"].shape == (N,)
    dq = next(n for n in result.model.graph.node if n.name == "mm1_W_DequantizeLinear")
    assert helper.get_attribute_value(dq.attribute[0]) == 0
    w = numpy_helper.to_array(model.graph.initializer[0]).T  # [K, N]
    w_deq = (inits["W_w8"].astype(np.float64) * inits["W_w8_scale"][:, None]).T
    for y_ref, y_out, a, t in zip(_run(model, x), _run(result.model, x), (x, np.tanh(x)), ("X", "Z")):
        bound = _bound(a, w_deq, float(inits[f"{t}_int8_scale"]), inits["W_w8_scale"], w)
        assert np.all(np.abs(y_out - y_ref) <= bound)


def test_per_tensor_weights():
    model, x = _tiny_model(), _data()
    result = QuantizeLinearLayers(_plan("int8"), _ranges(x), "uint8", per_channel=False)(model)
    inits = _inits(result.model)
    assert inits["W_w8_scale"].shape == ()
    assert not any(a.name == "axis" for n in result.model.graph.node for a in n.attribute)
    ref, out = _run(model, x), _run(result.model, x)
    w = numpy_helper.to_array(model.graph.initializer[0])
    sw = np.full(N, float(inits["W_w8_scale"]))
    bound = _bound(x.reshape(-1, K), inits["W_w8"] * sw, float(inits["X_uint8_scale"]), sw, w)
    assert np.all(np.abs(out[0] - ref[0]).reshape(-1, N) <= bound)


def test_w8a16_uses_16_bit_activations_in_the_microsoft_domain():
    model, x = _tiny_model(), _data()
    result = QuantizeLinearLayers(_plan("w8a16"), _ranges(x), "uint8")(model)
    q = [n for n in result.model.graph.node if n.op_type == "QuantizeLinear"]
    assert q and all(n.domain == "com.microsoft" for n in q)
    assert any(o.domain == "com.microsoft" for o in result.model.opset_import)
    inits = _inits(result.model)
    assert inits["X_uint16_zp"].dtype == np.uint16
    ref, out = _run(model, x), _run(result.model, x)
    w = numpy_helper.to_array(model.graph.initializer[0])
    sw = inits["W_w8_scale"]
    bound = _bound(x.reshape(-1, K), inits["W_w8"] * sw, float(inits["X_uint16_scale"]), sw, w)
    assert np.all(np.abs(out[0] - ref[0]).reshape(-1, N) <= bound)


def test_missing_activation_range_fails_as_a_pass_error():
    with pytest.raises(PassError, match=r"^error in pass QuantizeLinearLayers after passes \[\]: 'X'$"):
        run_passes(_tiny_model(), [QuantizeLinearLayers(_plan("int8"), {}, "uint8")])
