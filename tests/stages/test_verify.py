"""edgeq.stages.verify on the host, with small hand-made packages: a 5-node ONNX encoder converted by
convert_to_ort and a manifest written by finish() holding only the fields verify reads. (The real package is
verified in tests/test_pipeline.py; arm64 in tests/devices.)"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from edgeq.errors import VerificationError
from edgeq.manifest import MANIFEST, SCHEMA_VERSION
from edgeq.stages.package import MODEL_FILE, OPS_CONFIG, convert_to_ort, finish
from edgeq.stages.verify import TARGETS, verify
from tiny_models import tiny_onnx_encoder

VOCAB, HIDDEN = 50, 16
IDS = np.array([[2, 10, 11, 12, 3], [2, 20, 3, 0, 0], [2, 49, 1, 7, 3], [2, 5, 3, 0, 0]], np.int64)
MASK = (IDS != 0).astype(np.int64)


def tiny_encoder(path: Path) -> Path:
    return tiny_onnx_encoder(path, seed=1, vocab=VOCAB, hidden=HIDDEN)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """(folder holding model.ort and the ops config, FP32 last_hidden_state of the ONNX source for IDS/MASK)."""
    root = tmp_path_factory.mktemp("verify-src")
    src = tiny_encoder(root / "tiny.onnx")
    convert_to_ort(src, root / "converted", "arm")
    sess = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    (hidden,) = sess.run(None, {"input_ids": IDS, "attention_mask": MASK})
    return root / "converted", hidden


def reference(hidden: np.ndarray, pooling: str) -> np.ndarray:
    """Pooled by hand (not edgeq.runtime.pool): the masked mean, or token 0."""
    if pooling == "cls":
        return hidden[:, 0, :]
    return np.stack([hidden[i, MASK[i].astype(bool)].mean(0) for i in range(len(IDS))])


def make_package(built, folder: Path, *, scale: float = 1.0, pooling: str = "mean", ref_pooling: str | None = None,
                 **overrides) -> Path:
    """A package folder as verify expects it; ``overrides`` replace top-level manifest keys before finish()."""
    converted, hidden = built
    folder.mkdir(parents=True)
    for name in (MODEL_FILE, OPS_CONFIG):
        shutil.copy(converted / name, folder / name)
    ref = reference(hidden, ref_pooling or pooling) * scale
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "model": {"file": MODEL_FILE},
        "profile": {"values": {"accuracy": {"min_mean_cosine": 0.995}}},
        "verification": {
            "inputs": {"input_ids": IDS.tolist(), "attention_mask": MASK.tolist()},
            "pooling": pooling,
            "reference_pooled": [[round(float(x), 7) for x in row] for row in ref],
            "min_cosine": 0.9999,
            "max_rel_diff": 0.01,
        },
    }
    manifest.update(overrides)
    finish(folder, manifest)
    return folder


def checks(report) -> dict[str, tuple[bool, str]]:
    return {name: (ok, detail) for name, ok, detail in report.checks}


def match_detail(report) -> tuple[float, float]:
    """(min cosine, max |diff| / max |ref|) as reported by the 'outputs match reference' check."""
    detail = checks(report)["outputs match reference"][1]
    m = re.search(r"min cosine ([-\d.]+) .* max \|diff\| / max \|ref\| ([-+\d.e]+)", detail)
    assert m, detail
    return float(m.group(1)), float(m.group(2))


def test_fresh_package_passes_on_host(built, tmp_path):
    folder = make_package(built, tmp_path / "pkg")
    report = verify(folder)
    assert report.ok, report.checks
    assert report.on == "host" and report.package == folder
    got = checks(report)
    assert list(got) == [f"file {MODEL_FILE}", f"file {OPS_CONFIG}", "load and run", "outputs match reference"]
    assert "on host (4 samples)" in got["load and run"][1]
    cos, rel = match_detail(report)
    assert cos >= 0.9999 and rel <= 1e-6  # the .ort reproduces the ONNX source up to the manifest's 7 digits


def test_cls_pooling_is_read_from_the_manifest(built, tmp_path):
    assert verify(make_package(built, tmp_path / "cls", pooling="cls")).ok
    # a CLS reference checked with mean pooling (or the other way round) is a mismatch
    report = verify(make_package(built, tmp_path / "mixed", pooling="mean", ref_pooling="cls"))
    assert not report.ok
    assert not checks(report)["outputs match reference"][0]


def test_reference_scaled_by_two_fails_max_rel_diff_though_cosine_is_one(built, tmp_path):
    report = verify(make_package(built, tmp_path / "pkg", scale=2.0))
    assert not report.ok
    failed = [name for name, ok, _ in report.checks if not ok]
    assert failed == ["outputs match reference"]  # files and load are fine
    cos, rel = match_detail(report)
    assert cos == pytest.approx(1.0, abs=1e-6)  # cosine cannot see a change of scale ...
    assert rel == pytest.approx(0.5, rel=1e-3)  # ... |2r - r| / |2r| = 0.5 > max_rel_diff 0.01


def test_scale_change_within_max_rel_diff_passes(built, tmp_path):
    report = verify(make_package(built, tmp_path / "pkg", scale=1.004))  # rel diff 0.004 / 1.004 < 0.01
    assert report.ok, report.checks
    assert match_detail(report)[1] == pytest.approx(0.004 / 1.004, rel=1e-2)


def test_model_that_does_not_load_is_a_failed_check_not_a_crash(built, tmp_path):
    folder = make_package(built, tmp_path / "pkg")
    (folder / MODEL_FILE).write_bytes(b"not a flatbuffer" * 16)
    finish(folder, json.loads((folder / MANIFEST).read_text()))  # hashes match the broken file
    report = verify(folder)
    got = checks(report)
    assert got[f"file {MODEL_FILE}"][0]
    assert not got["load and run"][0] and got["load and run"][1]
    assert "outputs match reference" not in got


@pytest.mark.parametrize("folder", ["does-not-exist", None])
def test_unknown_target_is_refused(built, tmp_path, folder):
    path = tmp_path / folder if folder else make_package(built, tmp_path / "pkg")
    with pytest.raises(VerificationError) as err:
        verify(path, on="x86-phone")
    assert "x86-phone" in err.value.message
    assert all(t in err.value.hint for t in TARGETS)


def test_missing_manifest(built, tmp_path):
    folder = make_package(built, tmp_path / "pkg")
    (folder / MANIFEST).unlink()
    with pytest.raises(VerificationError) as err:
        verify(folder)
    assert MANIFEST in err.value.message
    assert "edgeq export" in err.value.hint


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, str(SCHEMA_VERSION), None])
def test_wrong_schema_version(built, tmp_path, version):
    folder = make_package(built, tmp_path / "pkg", schema_version=version)
    with pytest.raises(VerificationError) as err:
        verify(folder)
    assert "schema_version" in err.value.message and repr(version) in err.value.message
    assert "re-export" in err.value.hint


def test_reference_with_a_missing_row_is_a_failed_check(built, tmp_path):
    folder = make_package(built, tmp_path / "pkg")
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["verification"]["reference_pooled"].pop()  # the manifest is not hashed: anyone can edit it
    (folder / MANIFEST).write_text(json.dumps(manifest))
    report = verify(folder)
    assert not report.ok
    assert not checks(report)["outputs match reference"][0]
