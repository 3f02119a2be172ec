"""The arm64 device: PyPI's aarch64 onnxruntime run by Debian's arm64 CPython under qemu-user-static.

Nothing is mocked. The first run builds the runtime into <repo>/.cache/arm64-runtime (about 40 s and 225 MB on the
reference machine); later runs reuse it. The tests skip only when the runtime cannot be built because apt is
unavailable (no apt-get, not root while qemu-user-static is missing, or the Debian mirrors unreachable); any other
build failure fails them.

Tolerances, measured on the reference machine (x86_64 host ORT vs emulated arm64 ORT, same version):
  * the QDQ test model: the int8 GEMM is integer-exact on both, so outputs agree to float rounding (max |diff|
    measured 0.0 on Y, < 1e-6 on the LayerNorm output); the bound allows one int8 step of one activation;
  * the edgeq package (tiny BERT): per-sample pooled cosine >= 0.999 and max |diff| of the pooled embedding
    below PACKAGE_MAX_ABS (see the test). Re-quantization between layers turns last-bit float differences
    (fp16 LayerNorm, activation quantization in MatMulNBits) into whole int8 steps, so packages do not agree
    bit for bit across CPU architectures.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.errors import DeviceRunError
from edgeq.devices.arm64 import (FAKE_CPUS, PYTHON_VERSION, STAMP, cpuinfo_text, ensure_runtime,
                                 is_current, recipe_hash, run_on_arm64, write_cpu_tree)
from edgeq.metrics import per_sample_cosine
from edgeq.runtime import pool, session

device = pytest.mark.device

# Instructions of ONNX Runtime's ARM64 int8 GEMM kernels (MLAS): i8mm matrix-multiply-accumulate, or dot product.
INT8_MATRIX = {"smmla", "ummla", "usmmla", "sve-smmla", "sve-ummla", "sve-usmmla"}
INT8_DOT = {"sdot", "udot", "usdot", "sudot", "sve-sdot", "sve-udot"}
ORT_LIB = "onnxruntime_pybind11_state"

MIN_POOLED_COSINE = 0.999
PACKAGE_MAX_ABS = 0.05  # pooled embedding, tiny BERT; measured max 0.0 (see test); MiniLM-L6 package: 0.042


def qdq_model(path, hidden: int = 64, out: int = 96, seed: int = 0):
    """LayerNorm -> QDQ uint8 activations x int8 per-channel weights -> MatMul -> Add, the pattern edgeq quantizes
    linear layers to. Outputs Y and the LayerNorm output. ORT fuses the QDQ MatMul into an integer kernel."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((hidden, out)) * 0.1).astype(np.float32)
    w_scale = (np.abs(w).max(0) / 127).astype(np.float32)
    w_q = np.clip(np.round(w / w_scale), -127, 127).astype(np.int8)
    inits = [
        numpy_helper.from_array((1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32), "gamma"),
        numpy_helper.from_array((0.1 * rng.standard_normal(hidden)).astype(np.float32), "beta"),
        numpy_helper.from_array(np.array(8.0 / 255, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_zp"),
        numpy_helper.from_array(w_q, "w_q"),
        numpy_helper.from_array(w_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(out, np.int8), "w_zp"),
        numpy_helper.from_array((0.1 * rng.standard_normal(out)).astype(np.float32), "bias"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["X", "gamma", "beta"], ["LN"], axis=-1, epsilon=1e-12),
        helper.make_node("QuantizeLinear", ["LN", "x_scale", "x_zp"], ["LN_q"]),
        helper.make_node("DequantizeLinear", ["LN_q", "x_scale", "x_zp"], ["LN_dq"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["W"], axis=1),
        helper.make_node("MatMul", ["LN_dq", "W"], ["MM"]),
        helper.make_node("Add", ["MM", "bias"], ["Y"]),
    ]
    graph = helper.make_graph(
        nodes, "qdq_linear", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", "seq", out]),
         helper.make_tensor_value_info("LN", TensorProto.FLOAT, ["batch", "seq", hidden])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def qdq(tmp_path_factory):
    path = qdq_model(tmp_path_factory.mktemp("arm64") / "qdq_linear.onnx")
    x = np.random.default_rng(1).standard_normal((4, 32, 64)).astype(np.float32)
    return path, {"X": x}


@device
def test_runtime_is_stamped_and_reused(arm64_runtime):
    stamp = arm64_runtime.stamp
    assert stamp["onnxruntime"] == ort.__version__ and stamp["numpy"] == np.__version__
    assert stamp["recipe"] == recipe_hash()
    assert "i8mm" in stamp["cpu_features"] and "asimddp" in stamp["cpu_features"]
    t0 = time.monotonic()
    again = ensure_runtime(arm64_runtime.root)
    assert time.monotonic() - t0 < 5, "a current runtime must not be rebuilt"
    assert again.stamp["built"] == stamp["built"]


@device
def test_qdq_model_runs_on_aarch64_and_matches_host(arm64_runtime, qdq):
    path, feeds = qdq
    res = run_on_arm64(arm64_runtime, path, feeds)
    info = res.info
    assert info["machine"] == "aarch64"
    assert info["onnxruntime"] == ort.__version__
    assert "CPUExecutionProvider" in info["available_providers"]
    assert info["session_providers"] == ["CPUExecutionProvider"]
    assert res.names == ["Y", "LN"]

    host = session(path).run(None, feeds)
    for got, want in zip(res.outputs, host):
        assert got.shape == want.shape and got.dtype == want.dtype
    y_arm, ln_arm = res.outputs
    y_host, ln_host = host
    assert np.abs(ln_arm - ln_host).max() <= 1e-5  # fp32 LayerNorm: rounding only
    # one activation landing in the neighbouring uint8 bucket moves Y by x_scale * |w| <= 8/255 * 0.4
    assert np.abs(y_arm - y_host).max() <= 0.02
    cos = per_sample_cosine(y_host.mean(1), y_arm.mean(1))
    assert cos.min() >= MIN_POOLED_COSINE, cos


@device
def test_int8_matmul_runs_on_arm64_int8_kernels(arm64_runtime, qdq):
    """qemu logs every instruction block it translates: the int8 GEMM must have run ARM's i8mm instructions
    (the emulated CPU has them; MLAS picks i8mm over dot product when it can), from ONNX Runtime's library."""
    path, feeds = qdq
    res = run_on_arm64(arm64_runtime, path, feeds, trace_kernels=True)
    assert "i8mm" in res.info["cpu_features"]
    in_ort = {kind for kind, libs in res.kernels.items() if any(ORT_LIB in lib for lib in libs)}
    assert in_ort & INT8_MATRIX, f"no i8mm instruction ran in {ORT_LIB}: {res.kernels}"


@pytest.fixture(scope="module")
def tiny_package(tiny_bert_dir, tmp_path_factory):
    from edgeq.pipeline import ExportRequest, export_package

    out = tmp_path_factory.mktemp("arm64-pkg")
    return export_package(ExportRequest(tiny_bert_dir, "android-arm64", out_dir=out, samples=16))


@device
def test_edgeq_package_matches_on_arm64(arm64_runtime, tiny_package):
    m = tiny_package.manifest
    v = m["verification"]
    feeds = {k: np.asarray(a, dtype=np.int64) for k, a in v["inputs"].items()}
    model = tiny_package.path / m["model"]["file"]
    assert model.suffix == ".ort"
    res = run_on_arm64(arm64_runtime, model, feeds)
    assert res.info["machine"] == "aarch64"
    arm = pool(res.outputs[0], feeds["attention_mask"], v["pooling"])
    host = pool(session(model).run(None, feeds)[0], feeds["attention_mask"], v["pooling"])
    ref = np.asarray(v["reference_pooled"], dtype=np.float32)
    np.testing.assert_allclose(host, ref, atol=1e-5)  # the manifest's reference is the host's output
    # arm64 is held to FP32 by the profile's budget, as verify does; the x86 host is not the truth (an AVX2-only
    # x86 saturates int8 sums that ARM computes exactly), so arm64 vs host is not asserted here
    fp32 = np.asarray(v["fp32_pooled"], dtype=np.float32)
    budget = m["accuracy"]["budget"]
    cos = per_sample_cosine(fp32, arm)
    assert cos.min() >= budget["min_min_cosine"] and cos.mean() >= budget["min_mean_cosine"], cos
    assert np.abs(arm - fp32).max() <= PACKAGE_MAX_ABS


@device
def test_verify_on_arm64_holds_the_samples_to_fp32_within_the_accuracy_budget(arm64_runtime, tiny_package, tmp_path):
    from edgeq.stages.verify import verify

    report = verify(tiny_package.path, "arm64")
    assert report.ok, report.checks
    details = dict((n, d) for n, _, d in report.checks)
    detail = details["outputs vs FP32 within the accuracy budget"]
    need = tiny_package.manifest["profile"]["values"]["accuracy"]["min_min_cosine"]
    assert f"need >= {need})" in detail and detail.split("per sample")[1].count(", ") >= 3  # one cosine per sample
    assert "agreement with the host's reference (reported, not gated)" in details
    # the same package with a bar no device can meet fails on that check alone
    copy = tmp_path / "pkg"
    shutil.copytree(tiny_package.path, copy)
    for z in copy.glob("*.zip"):  # it holds the unedited manifest, and would fail check_zip besides
        z.unlink()
    m = json.loads((copy / "manifest.json").read_text())
    m["profile"]["values"]["accuracy"]["min_min_cosine"] = 1.5  # recorded profile values can only tighten
    (copy / "manifest.json").write_text(json.dumps(m))
    failed = [n for n, ok, _ in verify(copy, "arm64").checks if not ok]
    assert failed == ["outputs vs FP32 within the accuracy budget"]


@device
def test_a_broken_model_is_a_device_run_error(arm64_runtime, tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"this is not an onnx model")
    with pytest.raises(DeviceRunError) as exc:
        run_on_arm64(arm64_runtime, bad, {"X": np.zeros((1, 1), np.float32)})
    assert "broken.onnx" in exc.value.message and exc.value.hint


def test_cpu_tree_describes_one_consistent_arm_cpu(tmp_path):
    features = ["fp", "asimd", "asimddp", "i8mm"]
    write_cpu_tree(tmp_path, features)
    text = (tmp_path / "proc" / "cpuinfo").read_text()
    assert text == cpuinfo_text(features)
    assert text.count("processor\t:") == FAKE_CPUS
    assert "Features\t: fp asimd asimddp i8mm\n" in text and "CPU implementer\t: 0x41\n" in text
    cpu = tmp_path / "sys" / "devices" / "system" / "cpu"
    span = f"0-{FAKE_CPUS - 1}"
    for name in ("possible", "present", "online"):
        assert (cpu / name).read_text().strip() == span
    assert sorted(p.name for p in cpu.glob("cpu[0-9]*")) == [f"cpu{i}" for i in range(FAKE_CPUS)]


def test_a_changed_version_or_recipe_means_a_rebuild(tmp_path):
    versions = {"onnxruntime": "1.0.0", "numpy": "2.0.0"}
    python = tmp_path / "sysroot" / "usr" / "bin" / f"python{PYTHON_VERSION}"
    python.parent.mkdir(parents=True)
    python.touch()
    assert not is_current(tmp_path, versions)  # no stamp: an interrupted build
    (tmp_path / STAMP).write_text(json.dumps({**versions, "recipe": recipe_hash()}))
    assert is_current(tmp_path, versions)
    assert not is_current(tmp_path, {**versions, "onnxruntime": "1.0.1"})
    (tmp_path / STAMP).write_text(json.dumps({**versions, "recipe": "0" * 64}))
    assert not is_current(tmp_path, versions)


def test_the_runtime_cache_is_the_checkout_s_or_the_user_s_never_site_packages(tmp_path, monkeypatch):
    from edgeq.devices.arm64 import DEFAULT_CACHE, cache_root

    repo = Path(__file__).resolve().parents[2]
    assert DEFAULT_CACHE == repo / ".cache" / "arm64-runtime"  # tests run from a checkout
    installed = tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "edgeq" / "devices" / "arm64.py"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root(installed) == tmp_path / "xdg" / "edgeq"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root(installed) == Path.home() / ".cache" / "edgeq"
