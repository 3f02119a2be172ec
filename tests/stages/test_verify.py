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

from edgeq.errors import PackageError, UserInputError
from edgeq.manifest import MANIFEST, SCHEMA_VERSION
from edgeq.stages.package import MODEL_FILE, OPS_CONFIG, convert_to_ort, finish
from edgeq.stages.verify import verify
from edgeq.targets import TARGETS
from manifest_samples import encoder_manifest
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
    manifest = encoder_manifest(**{
        "model": {"file": MODEL_FILE},
        "profile": {"name": "android-arm64", "values": {"accuracy": {"min_mean_cosine": 0.995, "eval_seq_len": 5}}},
        "verification": {
            "inputs": {"input_ids": IDS.tolist(), "attention_mask": MASK.tolist()},
            "pooling": pooling,
            "reference_pooled": [[round(float(x), 7) for x in row] for row in ref],
            "min_cosine": 0.9999,
            "max_rel_diff": 0.01,
        },
    })
    finish(folder, manifest)
    if overrides:  # as given: finish() writes only what the schema takes
        (folder / MANIFEST).write_text(json.dumps({**json.loads((folder / MANIFEST).read_text()), **overrides}))
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
    assert list(got) == [f"file {MODEL_FILE}", f"file {OPS_CONFIG}", "thresholds", "load and run",
                         "outputs match reference"]
    assert got["thresholds"] == (True, "min_cosine 0.9999, max_rel_diff 0.01, device_min_cosine 0.999, "
                                       "device_max_rel_diff 0.05 (at least as strict as profile 'android-arm64')")
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
    with pytest.raises(UserInputError) as err:
        verify(path, on="x86-phone")
    assert "x86-phone" in err.value.message
    assert all(t in err.value.hint for t in TARGETS)


def test_missing_manifest(built, tmp_path):
    folder = make_package(built, tmp_path / "pkg")
    (folder / MANIFEST).unlink()
    with pytest.raises(PackageError) as err:
        verify(folder)
    assert MANIFEST in err.value.message
    assert "edgeq export" in err.value.hint


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, str(SCHEMA_VERSION), None])
def test_wrong_schema_version(built, tmp_path, version):
    folder = make_package(built, tmp_path / "pkg", schema_version=version)
    with pytest.raises(PackageError) as err:
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


# ---------------------------------------------------------------------------------------------------- bars
# The manifest is not hashed: its bars count only where they are stricter than the profile's (module doc).

def edit_manifest(folder: Path, edit) -> Path:
    manifest = json.loads((folder / MANIFEST).read_text())
    edit(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("key, value, profile_value, field", [
    ("min_cosine", -1.0, 0.9999, "verify_min_cosine"), ("max_rel_diff", 1e9, 0.01, "verify_max_rel_diff"),
    ("device_min_cosine", 0.0, 0.999, "device_min_cosine"), ("device_max_rel_diff", 2.0, 0.05, "device_max_rel_diff"),
])
def test_a_bar_looser_than_the_profile_fails_naming_it(built, tmp_path, key, value, profile_value, field):
    folder = edit_manifest(make_package(built, tmp_path / "pkg"), lambda m: m["verification"].update({key: value}))
    report = verify(folder)
    assert not report.ok
    ok, detail = checks(report)["thresholds"]
    assert not ok
    assert detail == (f"verification.{key} = {value} in the manifest is looser than {profile_value} "
                      f"(package.{field} of profile 'android-arm64')")
    assert checks(report)["outputs match reference"][0]  # the model itself reproduces, at the profile's bars


def test_a_loose_bar_does_not_let_moved_outputs_pass(built, tmp_path):
    """min_cosine -1 and max_rel_diff 10 used to pass a reference scaled by two; the profile's bars apply."""
    folder = edit_manifest(make_package(built, tmp_path / "pkg", scale=2.0),
                           lambda m: m["verification"].update(min_cosine=-1, max_rel_diff=10))
    got = checks(verify(folder))
    assert not got["thresholds"][0] and not got["outputs match reference"][0]
    assert "(need <= 0.01)" in got["outputs match reference"][1]


def test_a_stricter_bar_in_the_manifest_or_its_recorded_profile_is_kept(built, tmp_path):
    folder = make_package(built, tmp_path / "pkg", scale=1.004)  # rel diff 0.004: passes the profile's 0.01
    assert verify(folder).ok
    edit_manifest(folder, lambda m: m["verification"].update(max_rel_diff=0.001))
    got = checks(verify(folder))
    assert got["thresholds"][0] and not got["outputs match reference"][0]
    assert "(need <= 0.001)" in got["outputs match reference"][1]
    edit_manifest(folder, lambda m: (m["verification"].pop("max_rel_diff"),
                                     m["profile"]["values"].update(package={"verify_max_rel_diff": 0.002})))
    with pytest.raises(PackageError, match="'verification.max_rel_diff' must be a finite number, got missing"):
        verify(folder)
    edit_manifest(folder, lambda m: m["verification"].update(max_rel_diff=0.01))
    got = checks(verify(folder))
    assert not got["outputs match reference"][0] and "(need <= 0.002)" in got["outputs match reference"][1]
    # a looser recorded profile value does not loosen anything
    edit_manifest(folder, lambda m: m["profile"]["values"].update(package={"verify_max_rel_diff": 0.5,
                                                                             "verify_min_cosine": 0.0}))
    assert verify(folder).ok


def test_fewer_stored_samples_than_the_profile_asks_fails(built, tmp_path):
    def drop_two(m):
        v = m["verification"]
        v["inputs"] = {k: rows[:2] for k, rows in v["inputs"].items()}
        v["reference_pooled"] = v["reference_pooled"][:2]

    report = verify(edit_manifest(make_package(built, tmp_path / "pkg"), drop_two))
    ok, detail = checks(report)["thresholds"]
    assert not ok and detail == ("verification holds 2 samples, fewer than 4 "
                                 "(package.verify_samples of profile 'android-arm64')")


def test_an_unknown_profile_is_refused_with_the_known_names(built, tmp_path):
    folder = edit_manifest(make_package(built, tmp_path / "pkg"), lambda m: m["profile"].update(name="pixel-99"))
    with pytest.raises(PackageError, match=r"names an unknown profile 'pixel-99'") as err:
        verify(folder)
    assert "android-arm64" in err.value.hint and "linux-arm64" in err.value.hint


def test_a_custom_profile_gets_edgeq_defaults_not_its_recorded_file(built, tmp_path):
    """The manifest's profile.file is not read (the manifest chooses it): a user's .toml gets PackageSpec's bars."""
    loose = tmp_path / "loose.toml"
    loose.write_text("this file is never read")
    folder = edit_manifest(make_package(built, tmp_path / "pkg"),
                           lambda m: (m["profile"].update(name="my-phone", file=str(loose)),
                                      m["verification"].update(min_cosine=0.5)))
    ok, detail = checks(verify(folder))["thresholds"]
    assert not ok
    assert detail == ("verification.min_cosine = 0.5 in the manifest is looser than 0.9999 "
                      "(package.verify_min_cosine of edgeq's defaults (profile 'my-phone' is not bundled))")


def test_the_profile_given_by_the_export_sets_the_bars(built, tmp_path):
    """export verifies its fresh package against the profile it built with, --set included."""
    from edgeq.profiles import load_profile

    p = load_profile("android-arm64", overrides={"package.verify_min_cosine": 0.5})
    folder = edit_manifest(make_package(built, tmp_path / "pkg"), lambda m: m["verification"].update(min_cosine=0.5))
    assert not verify(folder).ok
    report = verify(folder, profile=p)
    assert report.ok, report.checks
    assert "as strict as profile 'android-arm64' as exported" in checks(report)["thresholds"][1]


@pytest.mark.parametrize("reference", [[[1.0, 2.0], [3.0]], [["a"] * HIDDEN] * 4, []])
def test_a_ragged_or_empty_reference_is_a_failed_check_not_a_crash(built, tmp_path, reference):
    folder = edit_manifest(make_package(built, tmp_path / "pkg"),
                           lambda m: m["verification"].update(reference_pooled=reference))
    report = verify(folder)
    assert not checks(report)["outputs match reference"][0]


def test_model_file_outside_the_package_is_refused_before_it_runs(built, tmp_path):
    outside = make_package(built, tmp_path / "other")  # a real model that would reproduce the reference
    for name in ("../other/model.ort", str(outside / MODEL_FILE)):
        folder = tmp_path / f"pkg{len(name)}"
        make_package(built, folder)
        edit_manifest(folder, lambda m: m["model"].update(file=name))
        with pytest.raises(PackageError, match="model.file .* is not a plain path inside the package"):
            verify(folder)
