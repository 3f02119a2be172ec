"""edgeq.profiles: the bundled android-qnn-htp profile and the ways a QNN profile can be wrong."""

from __future__ import annotations

import pytest

from edgeq.errors import ProfileError
from edgeq.profiles import PROFILES_DIR, describe_fields, load_profile

QNN = PROFILES_DIR / "android-qnn-htp.toml"


def qnn_with(tmp_path, old: str, new: str):
    text = QNN.read_text()
    assert text.count(old) == 1, f"{old!r} is not exactly once in {QNN}"
    path = tmp_path / "qnn.toml"
    path.write_text(text.replace(old, new))
    return path


def test_bundled_qnn_profile_loads_with_its_values():
    p = load_profile("android-qnn-htp")
    assert p.execution_provider == "QNNExecutionProvider"
    assert p.package.format == "onnx"
    q = p.qnn
    assert (q.activation_bits, q.weight_bits, q.sensitive_weight_bits) == (16, 8, 16)
    assert (q.seq_len, q.batch_size) == (64, 1)
    assert (q.soc_model, q.htp_arch) == (57, 75)
    assert q.mask_bias == -100.0
    assert p.accuracy.min_mean_cosine == 0.99


def test_every_qnn_field_is_documented():
    rows = {key: doc for key, _default, doc in describe_fields()}
    for key in ("qnn.seq_len", "qnn.activation_bits", "qnn.weight_bits", "qnn.soc_model", "qnn.htp_arch",
                "qnn.mask_bias", "qnn.verify_samples"):
        assert len(rows[key]) > 20, key


def test_typo_in_qnn_section_suggests_the_key(tmp_path):
    path = qnn_with(tmp_path, "seq_len = 64", "seq_lne = 64")
    with pytest.raises(ProfileError, match=r"unknown key 'qnn.seq_lne'") as exc:
        load_profile(str(path))
    assert exc.value.hint == "did you mean 'seq_len'?"


@pytest.mark.parametrize("old, new, message", [
    ("activation_bits = 16", "activation_bits = 12", r"'qnn.activation_bits' = 12 is not one of 8, 16"),
    ("htp_arch = 75", "htp_arch = 74", r"'qnn.htp_arch' = 74 is not one of"),
    ("mask_bias = -100.0", "mask_bias = -3.4e38", None),  # allowed: below -10, any value masks (it is not clamped)
    ("mask_bias = -100.0", "mask_bias = 0.0", r"'qnn.mask_bias' = 0.0 is out of range \(must be <= -10.0\)"),
    ("seq_len = 64", "seq_len = 4", r"'qnn.seq_len' = 4 is out of range"),
    ('format = "onnx"', 'format = "ort"', r"package.format = 'ort' does not fit execution_provider 'QNNExecutionProvider'"),
    ('execution_provider = "QNNExecutionProvider"', 'execution_provider = "QnnExecutionProvider"',
     r"'execution_provider' = 'QnnExecutionProvider' is not one of CPUExecutionProvider, QNNExecutionProvider"),
])
def test_bad_qnn_values_are_refused_with_the_key(tmp_path, old, new, message):
    path = qnn_with(tmp_path, old, new)
    if message is None:
        assert load_profile(str(path)).qnn.mask_bias == -3.4e38
        return
    with pytest.raises(ProfileError, match=message):
        load_profile(str(path))


def test_cpu_profile_with_onnx_format_is_refused(tmp_path):
    text = (PROFILES_DIR / "android-arm64.toml").read_text().replace('format = "ort"', 'format = "onnx"')
    path = tmp_path / "cpu.toml"
    path.write_text(text)
    with pytest.raises(ProfileError, match=r"does not fit execution_provider 'CPUExecutionProvider'") as exc:
        load_profile(str(path))
    assert exc.value.hint == "set package.format = 'ort'"


def test_qnn_profile_spells_out_every_qnn_key():
    import tomllib

    data = tomllib.loads(QNN.read_text())
    assert {f"qnn.{k}" for k in data["qnn"]} == {k for k, _d, _doc in describe_fields() if k.startswith("qnn.")}
