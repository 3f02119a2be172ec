"""bench/encoder_speed.py: the packages it compares against the bench's differ only in the profile lines it
changes (the sensitive layers' precision)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from encoder_speed import WEIGHT_ONLY, export_with  # noqa: E402
from manifest_samples import encoder_manifest  # noqa: E402

BUNDLED = ROOT / "export_profiles" / "android-arm64.toml"


def _build(tmp_path: Path, model: Path, profile_text: str) -> Path:
    """The two things export_with reads from a make bench build folder."""
    build = tmp_path / "build"
    (build / "edgeq" / "model-android-arm64").mkdir(parents=True)
    (build / "bench-profile.toml").write_text(profile_text)
    source = {"kind": "encoder", "architecture": "BertModel", "path": str(model)}  # an older package's: by path
    (build / "edgeq" / "model-android-arm64" / "manifest.json").write_text(json.dumps(encoder_manifest(source=source)))
    return build


@pytest.mark.encoders
def test_a_variant_export_changes_those_lines_and_keeps_the_others(tmp_path, tiny_bert_dir):
    from edgeq.profiles import load_profile

    build = _build(tmp_path, tiny_bert_dir, BUNDLED.read_text())
    lines = next(iter(WEIGHT_ONLY.values()))
    variant = json.loads((export_with(build, lines, tmp_path, "v") / "manifest.json").read_text())["profile"]["values"]
    bundled = json.loads(json.dumps(load_profile(str(BUNDLED)).to_dict()))  # as the manifest stores it
    assert bundled["quantization"]["sensitive_precision"] == "int8-per-token"
    assert variant["quantization"]["sensitive_precision"] == "int8-weight-only"
    assert variant["package"]["matmulnbits_accuracy_level"] == int(lines["matmulnbits_accuracy_level"])
    variant["quantization"]["sensitive_precision"] = "int8-per-token"
    variant["package"]["matmulnbits_accuracy_level"] = bundled["package"]["matmulnbits_accuracy_level"]
    assert {k: v for k, v in variant.items() if k not in ("source", "sha256")} == \
        {k: v for k, v in bundled.items() if k not in ("source", "sha256")}


def test_a_profile_without_the_line_is_refused_with_its_path(tmp_path):
    text = "\n".join(line for line in BUNDLED.read_text().splitlines() if "matmulnbits_accuracy_level" not in line)
    build = _build(tmp_path, tmp_path, text)
    with pytest.raises(SystemExit, match="bench-profile.toml has no single 'matmulnbits_accuracy_level = ' line"):
        export_with(build, {"matmulnbits_accuracy_level": "4"}, tmp_path, "v")
