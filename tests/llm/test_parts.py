"""A package run part after part (edgeq/llm/parts.py) computes what one session of it computes: the same logits to
the bit, the same greedy tokens as onnxruntime-genai, the same evaluation."""

import json
import shutil

import numpy as np
import onnx
import pytest
from llm.tiny_llama import tiny_llama

from edgeq.errors import PackageError
from edgeq.llm import parts as parts_module
from edgeq.llm.evaluate import evaluate_lm, lm_session, logit_chunks, package_runner
from edgeq.llm.genai import greedy_tokens
from edgeq.llm.greedy import greedy_margins, package_greedy
from edgeq.llm.parts import PartedModel, parted_greedy, parted_logits
from edgeq.pipeline import ExportRequest, export_package
from edgeq.stages.verify import verify

LAYERS = 4


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parts")
    src = tiny_llama(tmp / "src", layers=LAYERS)
    settings = {"llm.window_tokens": 64, "llm.context_length": 128, "llm.max_ppl_increase": 1.0,
                "llm.min_top1_agreement": 0.0}
    return export_package(ExportRequest(src, "android-arm64", out_dir=tmp / "out", settings=tuple(settings.items())))


@pytest.fixture
def one_layer_parts(monkeypatch):
    monkeypatch.setattr(parts_module, "PART_BYTES", 1)  # every layer a part of its own
    monkeypatch.setattr(parts_module, "WHOLE_BYTES", 0)


def windows(n: int = 2, length: int = 96) -> np.ndarray:
    return (np.arange(n * length, dtype=np.int64).reshape(n, length) * 7 + 3) % 600


def test_cut_keeps_whole_layers_in_order_and_every_node_once(package):
    model = PartedModel(package.path / "model.onnx", max_bytes=1, whole_bytes=0)
    graph = onnx.load(str(package.path / "model.onnx"), load_external_data=False).graph
    assert [p.layers for p in model.parts] == [(i, i) for i in range(LAYERS)]
    placed = [i for p in model.parts for i in p.nodes if graph.node[i].op_type != "Constant"]
    assert sorted(placed) == [i for i, n in enumerate(graph.node) if n.op_type != "Constant"]
    assert "logits" in model.parts[-1].outputs and "input_ids" in model.parts[0].inputs
    assert len(PartedModel(package.path / "model.onnx")) == 1  # a small package runs whole
    assert len(PartedModel(package.path / "model.onnx", max_bytes=1, whole_bytes=1 << 30)) == 1


def test_parted_logits_equal_one_session_bit_for_bit(package):
    model = PartedModel(package.path / "model.onnx", max_bytes=1, whole_bytes=0)
    w = windows()
    got = list(parted_logits(model, w, run_tokens=32))
    sess = lm_session(package.path / "model.onnx")
    want = [(i, first, logits) for i, ids in enumerate(w) for first, logits in logit_chunks(sess, ids, 32)]
    assert [(i, f) for i, f, _ in got] == [(i, f) for i, f, _ in want] == [(i, f) for i in range(2) for f in (0, 32, 64)]
    for (_, _, a), (_, _, b) in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_parted_greedy_equals_onnxruntime_genai(package):
    prompt = [int(i) for i in package.manifest["verification"]["prompt_ids"]]
    model = PartedModel(package.path / "model.onnx", max_bytes=1, whole_bytes=0)
    got = parted_greedy(model, prompt, 12, lambda t: False)
    assert got == greedy_tokens(package.path, prompt, 12)
    assert parted_greedy(model, prompt, 12, lambda t: t == got[3]) == got[:4]  # EOS ends it, included


def test_evaluation_and_verification_through_parts_equal_one_session(package, one_layer_parts):
    model_file = package.path / "model.onnx"
    assert isinstance(package_runner(model_file), PartedModel)
    w = windows()
    ref = package.path / "model.onnx"  # any reference: the two runs must agree exactly
    assert evaluate_lm(model_file, lm_session(ref), w) == evaluate_lm(lm_session(model_file), lm_session(ref), w)
    v = package.manifest["verification"]
    assert v["greedy_runtime"] == "onnxruntime-genai"  # the export ran it whole
    tokens, runtime = package_greedy(package.path, v["prompt_ids"], 16)
    assert (tokens, runtime) == (v["greedy_tokens"], f"onnxruntime, the graph in {LAYERS} parts opened in turn for "
                                                      "each token")
    assert greedy_margins(model_file, v["prompt_ids"], tokens) == v["logit_margins"]
    report = verify(package.path)  # the host check runs it in parts too
    assert report.ok and any("parts opened in turn" in detail for _, _, detail in report.checks)



def test_a_package_without_a_decoder_file_is_refused_by_name(package, tmp_path):
    folder = tmp_path / "pkg"
    shutil.copytree(package.path, folder)
    config = json.loads((folder / "genai_config.json").read_text())
    del config["model"]["decoder"]["filename"]
    (folder / "genai_config.json").write_text(json.dumps(config))
    with pytest.raises(PackageError, match="model.decoder.filename"):
        package_greedy(folder, [1, 2], 4)
