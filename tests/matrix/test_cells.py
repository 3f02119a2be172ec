"""Cells: one per model x profile the profile takes, each named by the hash of what its package is made from, with
its declared memory and the Ray resources it needs. On the tiny Llama (no optimum needed) unless a test says."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import pytest

from edgeq.errors import MatrixFileError
from edgeq.families import DECODER, OPTIMUM
from edgeq.manifest import tool_versions
from edgeq.matrix.cells import (PEAK_MEMORY, cell_key, differences, estimate_mb, peak_memory_mb, plan_cells,
                                request_from)
from edgeq.matrix.spec import load_matrix
from edgeq.modelsource import check_safetensors, inspect_model_dir
from matrix.conftest import FAST, matrix_file

LLM = ("llm.window_tokens=128", "llm.context_length=128")  # the tiny Llama holds 256 positions


def plan(tmp_path, models, profiles=("android-arm64",), settings=FAST + LLM, **kw):
    spec = load_matrix(matrix_file(tmp_path / "m.toml", [str(m) for m in models], profiles, settings, **kw))
    return plan_cells(spec, tmp_path / "out" / "cells")


def test_a_cell_per_model_and_profile_that_takes_it(tmp_path, tiny_dir):
    cells, skipped = plan(tmp_path, [tiny_dir], ("android-arm64", "ios-arm64"))
    (cell,) = cells
    assert (cell.name, cell.model, cell.profile, cell.device) == ("tiny-llama-android-arm64", "tiny-llama",
                                                                  "android-arm64", None)
    assert [(s.model, s.profile) for s in skipped] == [("tiny-llama", "ios-arm64")]
    assert "takes encoder models, not causal-lm" in skipped[0].reason


def test_the_key_hashes_the_manifests_provenance_and_the_tool_versions(tmp_path, tiny_dir):
    (cell,), _ = plan(tmp_path, [tiny_dir])
    inputs = cell.inputs
    assert cell.key == hashlib.sha256(json.dumps(inputs, separators=(",", ":")).encode()).hexdigest()
    files = inputs["source"]["files"]
    assert files["model.safetensors"] == hashlib.sha256((tiny_dir / "model.safetensors").read_bytes()).hexdigest()
    assert inputs["profile"]["overrides"]["quantization.calibration_samples"] == 16  # the file's set, in order
    assert inputs["profile"]["values"]["quantization"]["calibration_samples"] == 16  # the profile as applied
    assert inputs["tools"] == tool_versions()
    assert {"edgeq", "onnx", "onnxruntime", "transformers"} <= set(inputs["tools"])
    assert inputs["package"] == cell.name and inputs["calibration"]["file"] == "calibration.jsonl"
    # the same file planned again: the same key; the request a worker reads back is the one planned
    assert plan(tmp_path, [tiny_dir])[0][0].key == cell.key
    assert request_from(json.loads(json.dumps(cell.to_dict())), cell.request.out_dir) == cell.request


def test_every_input_that_changes_the_bytes_changes_the_key(tmp_path, tiny_dir):
    (base,), _ = plan(tmp_path, [tiny_dir])
    (other_setting,), _ = plan(tmp_path, [tiny_dir], settings=("quantization.calibration_samples=17",) + FAST[1:] + LLM)
    # the overrides' order is in the manifest's bytes, so in the key
    (reordered,), _ = plan(tmp_path, [tiny_dir], settings=FAST[::-1] + LLM)
    copy = shutil.copytree(tiny_dir, tmp_path / "tiny-llama")
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text() + "\n")
    (edited_source,), _ = plan(tmp_path, [copy])
    newer = {**base.inputs, "tools": {**base.inputs["tools"], "onnxruntime": "99.0"}}
    keys = [base.key, other_setting.key, reordered.key, edited_source.key, cell_key(newer)]
    assert len(set(keys)) == len(keys)
    ours = base.inputs["tools"]["onnxruntime"]
    assert differences(base.inputs, newer) == [f'tools.onnxruntime: "{ours}" != "99.0"']


def test_later_overrides_win_and_a_cell_table_picks_its_cells(tmp_path, tiny_dir):
    model = f'path = {str(tiny_dir)!r}\nset = ["quantization.calibration_samples=20"]'
    extra = ('\n[[cell]]\nprofile = "android-arm64"\n'
             'set = ["quantization.calibration_samples=24", "llm.symmetric=true"]\ndevice_check = true\n')
    (cell,), _ = plan(tmp_path, [model], extra=extra)
    assert cell.request.settings == (("quantization.calibration_samples", 24), ("quantization.sensitivity_samples", 16),
                                     ("llm.window_tokens", 128), ("llm.context_length", 128), ("llm.symmetric", True))
    assert cell.device == "arm64" and dict(cell.resources) == {"qemu_arm64": 1.0}  # the device check's resource


@pytest.mark.encoders
def test_a_qnn_cell_needs_the_htp_simulator(tmp_path, tiny_bert_dir):
    (cell,), _ = plan(tmp_path, [tiny_bert_dir], ("android-qnn-htp",), settings=())
    assert dict(cell.resources) == {"qnn_sim": 1.0} and cell.device is None


@pytest.mark.parametrize("extra, says, hint", [
    ('\n[[cell]]\nmodel = "llama"\nset = []\n', "[[cell]] 1 names the model 'llama', which is not in the matrix",
     "models in the matrix: tiny-llama"),
    ('\n[[cell]]\nmodel = "tiny-llama"\nset = ["llm.symetric=true"]\n', "cell tiny-llama x android-arm64: --set "
     "llm.symetric: no such profile key", "did you mean 'llm.symmetric'?"),
])
def test_a_cell_mistake_stops_the_matrix_before_any_work(tmp_path, tiny_dir, extra, says, hint):
    with pytest.raises(MatrixFileError) as info:
        plan(tmp_path, [tiny_dir], extra=extra)
    assert says in info.value.message and hint in info.value.hint
    assert not (tmp_path / "out").exists()


def test_two_models_of_one_name_are_refused(tmp_path, tiny_dir):
    with pytest.raises(MatrixFileError, match="models 1 and 2 are both named 'tiny-llama'"):
        plan(tmp_path, [tiny_dir, tiny_dir])
    (a, b), _ = plan(tmp_path, [tiny_dir, f'path = {str(tiny_dir)!r}\nname = "second"'])
    assert (a.name, b.name, b.request.name) == ("tiny-llama-android-arm64", "second-android-arm64",
                                                "second-android-arm64")
    assert a.key != b.key  # the package name is in the bytes (the zip's folder, the manifest's overrides)


def test_a_model_that_fails_its_checks_names_its_table(tmp_path):
    with pytest.raises(MatrixFileError, match=r"\[\[model\]\] 1: model folder .* does not exist"):
        plan(tmp_path, [tmp_path / "missing"])


@pytest.mark.parametrize("exporter, parameters, measured_mb", [
    (OPTIMUM, 22_713_216, 1960),  # all-MiniLM-L6-v2 (BENCHMARKS.md, edgeq android-arm64 row)
    (DECODER, 134_515_008, 1450),  # SmolLM2-135M (README)
    (DECODER, 1_235_814_400, 4130),  # Llama-3.2-1B-shaped (bench/results/scale.json)
])
def test_the_memory_estimate_covers_what_was_measured_within_10_percent(exporter, parameters, measured_mb):
    estimate = estimate_mb(exporter, parameters)
    assert measured_mb * 0.99 <= estimate <= measured_mb * 1.10, (estimate, PEAK_MEMORY[exporter])


def test_a_model_declares_the_estimate_unless_its_table_says(tmp_path, tiny_dir):
    (cell,), _ = plan(tmp_path, [tiny_dir])
    parameters = sum(math.prod(t["shape"]) for t in check_safetensors(tiny_dir / "model.safetensors").values())
    assert cell.memory_mb == peak_memory_mb(inspect_model_dir(tiny_dir)) == estimate_mb(DECODER, parameters)
    (declared,), _ = plan(tmp_path, [f'path = {str(tiny_dir)!r}\nmemory_mb = 333'])
    assert declared.memory_mb == 333 and declared.key == cell.key  # memory is not an input of the package


def test_a_gguf_file_is_a_model_of_its_architectures_family(tmp_path):
    from tiny_gguf import tiny_gguf

    (tmp_path / "g").mkdir()
    tiny_gguf(tmp_path / "g" / "m.gguf", "llama", context_length=256)
    (cell,), (skipped,) = plan(tmp_path, [tmp_path / "g" / "m.gguf"], ("android-arm64", "ios-arm64"))
    assert (cell.name, cell.request.model_dir, cell.request.gguf_file) == ("m-android-arm64", tmp_path / "g", "m.gguf")
    assert cell.inputs["source"]["files"] == {"m.gguf": hashlib.sha256((tmp_path / "g" / "m.gguf").read_bytes())
                                              .hexdigest()}  # the one file a GGUF export reads
    assert cell.memory_mb == estimate_mb(DECODER, 32)  # llama: edgeq's streamed decoder; its 4 x 8 table
    assert skipped.profile == "ios-arm64"
