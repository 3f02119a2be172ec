"""bench/encoder_speed.py: the package it compares against the bench's differs only in the weight-only layers'
accuracy_level."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from encoder_speed import export_at_level  # noqa: E402
from manifest_samples import encoder_manifest  # noqa: E402

BUNDLED = ROOT / "export_profiles" / "android-arm64.toml"


def _build(tmp_path: Path, model: Path, profile_text: str) -> Path:
    """The two things export_at_level reads from a make bench build folder."""
    build = tmp_path / "build"
    (build / "edgeq" / "model-android-arm64").mkdir(parents=True)
    (build / "bench-profile.toml").write_text(profile_text)
    source = {"kind": "encoder", "architecture": "BertModel", "path": str(model)}  # an older package's: by path
    (build / "edgeq" / "model-android-arm64" / "manifest.json").write_text(json.dumps(encoder_manifest(source=source)))
    return build


@pytest.mark.encoders
def test_level_4_export_changes_that_value_and_keeps_the_others(tmp_path, tiny_bert_dir):
    from edgeq.profiles import load_profile

    build = _build(tmp_path, tiny_bert_dir, BUNDLED.read_text())
    level4 = json.loads((export_at_level(build, 4, tmp_path) / "manifest.json").read_text())["profile"]["values"]
    level0 = json.loads(json.dumps(load_profile(str(BUNDLED)).to_dict()))  # as the manifest stores it
    assert level0["package"]["matmulnbits_accuracy_level"] == 0 and level4["package"]["matmulnbits_accuracy_level"] == 4
    level4["package"]["matmulnbits_accuracy_level"] = 0
    assert {k: v for k, v in level4.items() if k not in ("source", "sha256")} == \
        {k: v for k, v in level0.items() if k not in ("source", "sha256")}


def test_a_profile_without_the_line_is_refused_with_its_path(tmp_path):
    text = "\n".join(line for line in BUNDLED.read_text().splitlines() if "matmulnbits_accuracy_level" not in line)
    build = _build(tmp_path, tmp_path, text)
    with pytest.raises(SystemExit, match="bench-profile.toml has no single 'matmulnbits_accuracy_level = ' line"):
        export_at_level(build, 4, tmp_path)
