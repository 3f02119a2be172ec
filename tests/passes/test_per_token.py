"""edgeq.passes.per_token through QuantizeLinearLayers: int8 weights per channel, uint8 activations per token.

The reference is the arithmetic itself in numpy (float64): per row x of X and the activation's zero point Z (and
floor F, if any), s = max(max(x) / (255 - Z), -min(x) / Z, 1e-12) with F in place of min(x),
xq = clip(round(x / s) + Z, 0, 255) (ties to even, as QuantizeLinear), and Y = s * (xq - Z) @ Wq * sw. ORT computes
the same in float32 with an exact integer GEMM, so they agree to float32 rounding of a few ops (1e-5 relative to
max |Y|). Against the float model each element is within the quantization bound s / 2 * sum_k |Wq * sw| +
sw / 2 * sum_k |x| (+ float32 slack) when no value is below a floor.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.passes.per_token import TokenQuant
from edgeq.passes.quantize_linear import QuantizeLinearLayers, quantize_weight
from edgeq.policy import NodeDecision, PrecisionPlan
from edgeq.runtime import session

K, N = 24, 8


def _model(opset: int, batch: int, gemm: bool = False, alpha: float = 1.0, beta: float = 1.0) -> onnx.ModelProto:
    """X [batch, 5, K] -> mm1 = X @ W, mm3 = X @ W3 (one input, two layers); Z = Tanh(X) -> mm2 = Z @ W. gemm: mm1
    is a Gemm over X as [5, K] with transB=1, alpha, beta and a bias C (batch must be 1)."""
    rng = np.random.default_rng(7)
    w = (rng.standard_normal((K, N)) * np.linspace(0.05, 2.0, N)).astype(np.float32)
    w3 = rng.standard_normal((K, N)).astype(np.float32)
    shape = [5, K] if gemm else [batch, 5, K]
    if gemm:
        mm1 = helper.make_node("Gemm", ["X", "Wt", "C"], ["Y1"], name="mm1", transB=1, alpha=alpha, beta=beta)
    else:
        mm1 = helper.make_node("MatMul", ["X", "W"], ["Y1"], name="mm1")
    nodes = [mm1, helper.make_node("Tanh", ["X"], ["Z"], name="tanh"),
             helper.make_node("MatMul", ["Z", "W"], ["Y2"], name="mm2"),
             helper.make_node("MatMul", ["X", "W3"], ["Y3"], name="mm3")]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(w3, "W3"),
             numpy_helper.from_array(np.ascontiguousarray(w.T), "Wt"),
             numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "C")]
    outs = [helper.make_tensor_value_info(y, TensorProto.FLOAT, [*shape[:-1], N]) for y in ("Y1", "Y2", "Y3")]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)], outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(m, full_check=True)
    return m


def _plan(op1: str = "MatMul") -> PrecisionPlan:
    ds = [NodeDecision(n, op, "linear", "linear", "int8-per-token", "test")
          for n, op in (("mm1", op1), ("mm2", "MatMul"), ("mm3", "MatMul"))]
    return PrecisionPlan(tuple(ds) + (NodeDecision("tanh", "Tanh", "other", "", "fp32", "test"),))


def _x(shape, zero_row: bool = False) -> np.ndarray:
    x = (np.random.default_rng(3).standard_normal(shape) * 2.0).astype(np.float32)
    x[..., 0] *= 20.0  # an outlier channel, as LayerNorm outputs have
    if zero_row:
        x.reshape(-1, K)[1] = 0.0
    return x


def _scales(rows: np.ndarray, tq: TokenQuant) -> np.ndarray:
    lo = rows.min(1) if tq.floor is None else np.full(len(rows), tq.floor)
    return np.maximum(np.maximum(rows.max(1) / (255 - tq.z), -lo / tq.z), 1e-12)[:, None]


def _reference(x: np.ndarray, w: np.ndarray, tq: TokenQuant = TokenQuant()) -> np.ndarray:
    """The per-token arithmetic in float64 (weights as the pass quantizes them)."""
    q, sw = quantize_weight(w, 1, per_channel=True)
    rows = x.reshape(-1, K).astype(np.float64)
    s = _scales(rows, tq)
    xq = np.clip(np.round(rows / s) + tq.z, 0, 255)
    y = s * ((xq - tq.z) @ q.astype(np.float64)) * sw.astype(np.float64)
    return y.reshape(*x.shape[:-1], w.shape[1])


def _bound(x: np.ndarray, w: np.ndarray, tq: TokenQuant = TokenQuant()) -> np.ndarray:
    q, sw = quantize_weight(w, 1, per_channel=True)
    rows = x.reshape(-1, K).astype(np.float64)
    s = _scales(rows, tq)
    b = (s / 2 * np.abs(q * sw).sum(0) + sw / 2 * np.abs(rows).sum(1, keepdims=True)
         + 1e-5 * np.abs(rows) @ np.abs(w) + 1e-6)
    return b.reshape(*x.shape[:-1], w.shape[1])


@pytest.mark.parametrize("opset, batch", [(17, 1), (18, 1), (18, 3)])  # opset 18: ReduceMax takes axes as an input
def test_per_token_output_is_its_arithmetic_and_within_the_bound(opset, batch):
    model, x = _model(opset, batch), _x((batch, 5, K), zero_row=True)
    result = QuantizeLinearLayers(_plan(), {}, "uint8")(model)  # no calibrated ranges needed
    assert result.modified
    onnx.checker.check_model(result.model, full_check=True)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    ref = session(model).run(None, {"X": x})
    out = session(result.model).run(None, {"X": x})
    for y_ref, y_out, a, w in zip(ref, out, (x, np.tanh(x), x), (inits["W"], inits["W"], inits["W3"])):
        assert y_out.shape == y_ref.shape
        want = _reference(a, w)
        np.testing.assert_allclose(y_out, want, rtol=0, atol=1e-5 * np.abs(want).max())
        assert np.all(np.abs(y_out - y_ref) <= _bound(a, w))
        assert np.all(y_out.reshape(-1, N)[1] == 0) if a is x else True  # an all-zero token gives exactly 0


def test_each_input_is_quantized_once_and_each_weight_stored_once():
    result = QuantizeLinearLayers(_plan(), {}, "uint8")(_model(18, 1))
    g = result.model.graph
    assert sorted(n.input[0] for n in g.node if n.op_type == "QuantizeLinear") == ["X_pt_scaled", "Z_pt_scaled"]
    assert [n.op_type for n in g.node].count("ReduceMax") == 2  # one row maximum per input, not per layer
    assert [n.op_type for n in g.node].count("MatMul") == 3
    names = [i.name for i in g.initializer]
    assert names.count("W_pt") == 1 and "W" not in names and "W3" not in names  # float weights dropped
    assert {i.data_type for i in g.initializer if i.name in ("W_pt", "W3_pt")} == {TensorProto.INT8}
    assert not any(n.name in ("mm1", "mm2", "mm3") for n in g.node)  # replaced, not kept beside
    assert any(o.domain == "com.microsoft" for o in result.model.opset_import)


def test_onnx_runtime_fuses_the_integer_gemm_and_computes_the_same(tmp_path):
    """With QDQ fusion (packages, speed) each layer is one MatMulIntegerToFloat, u8s8; measurements run it unfused
    (edgeq.runtime.session's default). On a VNNI or ARM CPU both are the exact integer products."""
    model, x = _model(18, 1), _x((1, 5, K))
    result = QuantizeLinearLayers(_plan(), {}, "uint8")(model)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "fused.onnx")
    fused = ort.InferenceSession(result.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(tmp_path / "fused.onnx").graph.node]
    assert ops.count("MatMulIntegerToFloat") == 3 and "MatMul" not in ops and "DequantizeLinear" not in ops
    for a, b in zip(fused.run(None, {"X": x}), session(result.model).run(None, {"X": x})):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("alpha, beta", [(1.0, 1.0), (0.5, 2.0)])
def test_gemm_with_trans_b_alpha_beta_and_bias(alpha, beta):
    model, x = _model(18, 1, gemm=True, alpha=alpha, beta=beta), _x((5, K))
    result = QuantizeLinearLayers(_plan("Gemm"), {}, "uint8")(model)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    y_ref = session(model).run(None, {"X": x})[0]
    y_out = session(result.model).run(None, {"X": x})[0]
    want = alpha * _reference(x, inits["W"]) + beta * inits["C"]
    np.testing.assert_allclose(y_out, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert np.all(np.abs(y_out - y_ref) <= alpha * _bound(x, inits["W"]) + 1e-5 * np.abs(y_ref))


def test_a_zero_point_and_floor_from_calibration_are_used_and_values_below_the_floor_saturate():
    """Z = Tanh(X) with Z = 40 and floor -0.5 (its real minimum is about -1): the reference arithmetic to float32
    rounding, codes of values below the floor saturate at 0 (QuantizeLinear) rather than wrap, and no ReduceMin is
    computed for it. X keeps the row minimum (no floor given)."""
    model, x = _model(18, 1), _x((1, 5, K))
    tq = TokenQuant(40, -0.5)
    result = QuantizeLinearLayers(_plan(), {}, "uint8", token_quant={"Z": tq})(model)
    g = result.model.graph
    assert [n.op_type for n in g.node].count("ReduceMin") == 1  # X's only
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    y2 = session(result.model).run(None, {"X": x})[1]
    want = _reference(np.tanh(x), inits["W"], tq)
    np.testing.assert_allclose(y2, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert np.tanh(x).min() < -0.5  # some values are clipped at the floor


def test_token_quant_fits_a_floor_where_every_minimum_is_alike_and_z_near_the_middle_for_symmetric_rows():
    rng = np.random.default_rng(0)
    hi = rng.uniform(2, 10, 500)
    gelu = TokenQuant.fit(np.full(500, -0.17) + rng.uniform(0, 0.005, 500), hi)
    assert gelu.floor is not None and gelu.floor == pytest.approx(-0.17, abs=1e-3) and 5 <= gelu.z <= 30
    sym = TokenQuant.fit(-rng.uniform(1, 30, 500), rng.uniform(1, 30, 500))
    assert sym.floor is None and 100 <= sym.z <= 155
    assert TokenQuant.fit(np.zeros(0), np.zeros(0)) == TokenQuant()
