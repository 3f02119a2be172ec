"""Byte-reproducible packages (issue 13 item 6): two exports of the same inputs into different OUT folders give the
same bytes in every file, and ``edgeq verify --rebuild`` re-exports a package from its manifest and compares them.

The zip is not compared here: it sits beside the package folder with the build's timestamps until the change that
makes it deterministic and moves it inside the folder is merged; from then on the folder comparison covers it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.manifest import file_entries, read_manifest, write_manifest
from edgeq.pipeline import ExportRequest, export_package
from edgeq.stages.ort_format import _session

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = 16


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def edgeq(*args) -> "click.testing.Result":  # noqa: F821
    return CliRunner().invoke(main, [str(a) for a in args])


def export_in_child(hash_seed: int, *args) -> subprocess.CompletedProcess:
    """``edgeq export ARGS`` in a fresh Python with its own string-hash seed: set and dict-of-set orders, and
    ONNX Runtime's per-process hash seeds, differ from this process's."""
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
    run = subprocess.run([sys.executable, "-c", "from edgeq.cli import main; main()", "export", *map(str, args), "-q"],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    return run


@pytest.fixture(scope="module")
def two_encoder_packages(tiny_bert_dir, tmp_path_factory) -> tuple[Path, Path]:
    """One export in this process, one in a child Python, into different OUT folders."""
    tmp = tmp_path_factory.mktemp("repro")
    a = export_package(ExportRequest(tiny_bert_dir, "android-arm64", out_dir=tmp / "one", samples=SAMPLES))
    out = tmp / "two" / "deeper"
    export_in_child(1, tiny_bert_dir, "--profile", "android-arm64", "-o", out, "--samples", SAMPLES)
    return a.path, out / a.path.name


@pytest.mark.encoders
def test_two_encoder_exports_are_byte_identical(two_encoder_packages):
    a, b = two_encoder_packages
    one, two = folder_bytes(a), folder_bytes(b)
    assert {"model.ort", "required_operators_and_types.config", "manifest.json", "tokenizer.json"} <= set(one)
    assert sorted(one) == sorted(two)
    assert [n for n in one if one[n] != two[n]] == []


@pytest.mark.encoders
def test_manifest_records_no_local_path_and_no_time(two_encoder_packages, tiny_bert_dir):
    a, _ = two_encoder_packages
    text = (a / "manifest.json").read_text()
    for path in (a.parent, tiny_bert_dir, tiny_bert_dir.resolve(), ROOT):
        assert str(path) not in text, path
    m = json.loads(text)
    assert "created" not in m and "path" not in m["source"]
    assert m["source"]["name"] == "tiny-bert" and m["source"]["files"]["model.safetensors"]
    assert m["profile"]["file"] == "android-arm64.toml" == m["profile"]["values"]["source"]
    assert m["calibration"]["file"] == "calibration.jsonl" and len(m["calibration"]["sha256"]) == 64
    assert m["accuracy"]["evaluation_file"] == "evaluation.jsonl"


@pytest.mark.encoders
def test_ops_config_names_the_model_by_file_name(two_encoder_packages):
    a, _ = two_encoder_packages
    lines = (a / "required_operators_and_types.config").read_text().splitlines()
    assert lines[:2] == ["# Generated from model/s:", "# - model.ort"]


@pytest.mark.encoders
def test_verify_rebuild_passes_on_an_untouched_package(two_encoder_packages, tiny_bert_dir):
    a, _ = two_encoder_packages
    result = edgeq("verify", a, "--rebuild", "--model", tiny_bert_dir)
    assert result.exit_code == 0, result.output
    assert "same model.ort" in result.stdout and "same manifest.json" in result.stdout
    assert f"all {len(folder_bytes(a))} files byte-identical" in result.stdout


@pytest.mark.encoders
def test_verify_rebuild_fails_on_a_consistent_but_different_package(two_encoder_packages, tiny_bert_dir, tmp_path):
    """One byte of model.ort changed where it changes no output (the producer version string), and the manifest's
    file entry updated to match: plain verify passes, the rebuild names the two files that differ."""
    pkg = Path(shutil.copytree(two_encoder_packages[0], tmp_path / "pkg" / two_encoder_packages[0].name))
    data = bytearray((pkg / "model.ort").read_bytes())
    version = _session(memoryview(bytes(data))).Model().ProducerVersion()
    assert version and data.count(version) == 1
    at = data.find(version) + len(version) - 1
    data[at] = ord("9") if data[at] != ord("9") else ord("8")
    (pkg / "model.ort").write_bytes(bytes(data))
    manifest = read_manifest(pkg).to_dict()
    manifest["files"] = file_entries(pkg)
    write_manifest(pkg, manifest)
    assert edgeq("verify", pkg).exit_code == 0

    result = edgeq("verify", pkg, "--rebuild", "--model", tiny_bert_dir)
    assert result.exit_code == 1, result.output
    assert "DIFF model.ort" in result.stdout and "DIFF manifest.json" in result.stdout
    assert "same tokenizer.json" in result.stdout
    assert "error: the rebuild of" in result.stderr and "differs in 2 of" in result.stderr
    assert "hint:" in result.stderr and "Traceback" not in result.output


@pytest.mark.encoders
def test_verify_rebuild_without_the_source_folder(two_encoder_packages):
    result = edgeq("verify", two_encoder_packages[0], "--rebuild")
    assert result.exit_code == 2, result.output
    assert "names its source (tiny-bert) by file hashes only" in result.stderr
    assert "hint: pass the source model folder with --model DIR" in result.stderr


@pytest.mark.encoders
def test_verify_rebuild_with_a_changed_source(two_encoder_packages, tiny_bert_dir, tmp_path):
    src = Path(shutil.copytree(tiny_bert_dir, tmp_path / "tiny-bert"))
    (src / "vocab.txt").write_text((src / "vocab.txt").read_text() + "extra\n")
    result = edgeq("verify", two_encoder_packages[0], "--rebuild", "--model", src)
    assert result.exit_code == 2, result.output
    assert "is not the package's source: vocab.txt (sha256 differs)" in result.stderr
    assert "hint: pass the exact folder the package was made from" in result.stderr


@pytest.mark.encoders
def test_verify_rebuild_with_another_calibration_file(two_encoder_packages, tiny_bert_dir, tmp_path):
    other = tmp_path / "calibration.jsonl"
    other.write_text(json.dumps({"text": "another text"}) + "\n")
    result = edgeq("verify", two_encoder_packages[0], "--rebuild", "--model", tiny_bert_dir, "--calibration", other)
    assert result.exit_code == 2, result.output
    assert f"calibration file {other} differs from the one the package was made with (calibration.jsonl" in result.stderr
    assert "hint: pass that file with --calibration" in result.stderr


@pytest.mark.encoders
def test_a_named_package_records_its_name_and_rebuilds_under_it(two_encoder_packages, tiny_bert_dir, tmp_path):
    """--name names the folder, the zip and the zip's top folder; the manifest records it (and only then: a default
    name adds no key, so packages exported before --name existed rebuild to the same bytes)."""
    import zipfile

    default = json.loads((two_encoder_packages[0] / "manifest.json").read_text())
    assert "package_name" not in default["profile"]["overrides"]
    out = tmp_path / "out"
    result = edgeq("export", tiny_bert_dir, "--profile", "android-arm64", "-o", out, "--samples", SAMPLES,
                   "--name", "bert-v2_final.1", "-q")
    assert result.exit_code == 0, result.output
    pkg = out / "bert-v2_final.1"
    assert result.stdout.startswith(f"wrote {pkg}\n") and sorted(p.name for p in out.iterdir()) == [pkg.name]
    with zipfile.ZipFile(pkg / "bert-v2_final.1.zip") as z:
        assert {n.split("/")[0] for n in z.namelist()} == {"bert-v2_final.1"}
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["profile"]["overrides"]["package_name"] == "bert-v2_final.1"
    assert folder_bytes(pkg)["model.ort"] == folder_bytes(two_encoder_packages[0])["model.ort"]
    result = edgeq("verify", pkg, "--rebuild", "--model", tiny_bert_dir)
    assert result.exit_code == 0, result.output
    assert "same bert-v2_final.1.zip" in result.stdout


# A tiny random model's perplexity moves freely; the budgets are checked by tests/recipes/test_causal_lm.py.
LLM_SETTINGS = {"llm.window_tokens": 128, "llm.context_length": 128, "llm.max_ppl_increase": 1.0,
                "llm.min_top1_agreement": 0.0}


def test_two_llm_exports_are_byte_identical(tiny_dir, tmp_path):
    """The GenAI folder (model.onnx, genai_config.json, tokenizer files, manifest): GPTQ, the graph passes and the
    config writers give the same bytes in another process."""
    a = export_package(ExportRequest(tiny_dir, "android-arm64", out_dir=tmp_path / "one",
                                     settings=tuple(LLM_SETTINGS.items())))
    out = tmp_path / "two"
    export_in_child(2, tiny_dir, "--profile", "android-arm64", "-o", out,
                    *[x for k, v in LLM_SETTINGS.items() for x in ("--set", f"{k}={v}")])
    one, two = folder_bytes(a.path), folder_bytes(out / a.path.name)
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "manifest.json"} <= set(one)
    assert sorted(one) == sorted(two)
    assert [n for n in one if one[n] != two[n]] == []
    m = json.loads(one["manifest.json"])
    assert m["calibration"]["file"] == "calibration.jsonl" and m["accuracy"]["evaluation_file"] == "evaluation.jsonl"
    assert "seconds" not in m["precision"]["int4"] and "created" not in m
