"""edgeq.devices.qnn_htp on the real QNN HTP simulator (the onnxruntime-qnn wheel's x86_64 libQnnHtp.so).

Tiny models compile and run in well under a second, so these are fast tests. Tolerances: a 16-bit-activation,
8-bit-weight QDQ model's outputs are compared with its float source at 2% of the output range (an 8-bit weight step
is 1/255 of the weight range; 8 accumulated products stay well inside 2%).
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.devices import qnn_htp
from edgeq.errors import DeviceRunError, DeviceUnavailableError
from edgeq.profiles import QNNSpec
from edgeq.qnn.quantize import write_qdq
from edgeq.runtime import session

pytest.importorskip("onnxruntime_qnn", reason="edgeq[qnn] is not installed (make setup installs it)")

SPEC = QNNSpec()  # 16-bit activations, 8-bit weights, v75


def float_model(path, op: str = "Relu"):
    rng = np.random.default_rng(0)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="matmul"), helper.make_node(op, ["h"], ["y"], name="act")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def qdq(tmp_path_factory):
    d = tmp_path_factory.mktemp("qnn")
    src = float_model(d / "float.onnx")
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((1, 8)).astype(np.float32)} for _ in range(16)]
    return src, write_qdq(src, d / "qdq.onnx", feeds, SPEC, []), feeds


def test_qdq_model_runs_entirely_on_htp_and_matches_float(qdq):
    src, path, feeds = qdq
    run = qnn_htp.run_htp(path, feeds[:4], SPEC.soc_model, SPEC.htp_arch)
    assert set(run.placement.nodes) == {"QNNExecutionProvider"}
    assert run.placement.htp_fraction == 1.0 and run.placement.partitions == {"QNNExecutionProvider": 1}
    ref = session(src)
    for f, out in zip(feeds, run.outputs):
        want = ref.run(None, f)[0]
        assert np.abs(out - want).max() <= 0.02 * np.abs(want).max() + 1e-6


def test_context_binary_loads_and_computes_what_the_qdq_model_computes(qdq, tmp_path):
    _src, path, feeds = qdq
    ctx = tmp_path / "ctx.onnx"
    compiled = qnn_htp.compile_context(path, ctx, SPEC.soc_model, SPEC.htp_arch)
    assert compiled.htp_fraction == 1.0
    assert [n.op_type for n in onnx.load(str(ctx)).graph.node] == ["EPContext"]
    direct = qnn_htp.run_htp(path, feeds[:2], SPEC.soc_model, SPEC.htp_arch)
    precompiled = qnn_htp.run_htp(ctx, feeds[:2], SPEC.soc_model, SPEC.htp_arch)
    assert precompiled.placement.nodes == {"QNNExecutionProvider": 1}  # the one EPContext node
    for a, b in zip(direct.outputs, precompiled.outputs):
        np.testing.assert_array_equal(a, b)  # same compiled graph, same fixed-point arithmetic


def test_a_node_htp_cannot_take_fails_the_session_and_is_named(tmp_path):
    path = float_model(tmp_path / "erf.onnx", op="Erf")  # float Erf: HTP has no kernel, and there is no fallback
    with pytest.raises(DeviceRunError, match=r"does not run entirely on QNN HTP \(htp_arch v75\).*nodes HTP refused: "
                                             r".*act \(Erf\)") as exc:
        qnn_htp.htp_session(path, SPEC.soc_model, SPEC.htp_arch)
    assert "no CPU fallback" in exc.value.hint


def test_missing_qnn_wheel_is_a_device_unavailable_error_with_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # what `import` sees when the wheel is absent
    with pytest.raises(DeviceUnavailableError, match="onnxruntime-qnn") as exc:
        qnn_htp.qnn_module()
    assert "pip install 'edgeq[qnn]'" in exc.value.hint
