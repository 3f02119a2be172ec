"""The encoder-on-QNN recipe (edgeq/recipes/encoder_qnn.py, profile android-qnn-htp) end to end on a tiny random
BERT, on the real HTP simulator (about 10 s).

The accuracy check here is independent of edgeq: the reference is transformers' FP32 BertModel in torch with mean
pooling, the candidate the package's EPContext model on the HTP simulator, both fed the same static-shape token
ids. Tolerance: cosine >= 0.99999 per text, what 16-bit activations and 8-bit weights on a 2-layer model hold
(measured 0.9999997 on every text, on the simulator's and on torch's side alike; the profile's budget, 0.99, would
not notice a wrong scale on one layer).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeq.errors import DeviceUnavailableError, UserInputError
from edgeq.pipeline import ExportRequest, export_package
from edgeq.stages.verify import verify

pytest.importorskip("onnxruntime_qnn", reason="edgeq[qnn] is not installed (make setup installs it)")

ROOT = Path(__file__).resolve().parents[2]
TEXTS = [json.loads(line)["text"] for line in (ROOT / "calibration_data" / "evaluation.jsonl").read_text().splitlines()[:3]]


@pytest.fixture(scope="module")
def package(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qnn-out")
    return export_package(ExportRequest(tiny_bert_dir, "android-qnn-htp", out, samples=16))


def test_package_holds_the_portable_qdq_model_and_the_context_model(package):
    files = set(package.manifest["files"])
    assert {"model.onnx", "model_ctx.onnx", "tokenizer.json", "vocab.txt"} <= files
    assert not any(f.endswith(".ort") for f in files)
    model = onnx.load(str(package.path / "model.onnx"))
    shapes = [[d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert shapes == [[1, 64]] * len(model.graph.input)  # static, as qnn.batch_size x qnn.seq_len
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops and not ops & {"If", "Loop", "Scan"}
    ctx = onnx.load(str(package.path / "model_ctx.onnx"))
    assert [n.op_type for n in ctx.graph.node] == ["EPContext"]


def test_manifest_records_every_node_on_htp_with_fallback_disabled(package):
    q = package.manifest["qnn"]
    assert (package.manifest["schema_version"], package.manifest["recipe"]) == (2, "encoder-qnn")
    nodes = len(onnx.load(str(package.path / "model.onnx")).graph.node)
    sim = q["simulator"]
    assert sim["cpu_ep_fallback"] == "disabled"
    placed = sim["runs"]["model.onnx"]["placement"]["nodes"]
    # ONNX Runtime gives each consumer of a shared weight its own DequantizeLinear before partitioning, so the
    # session graph has at least the file's nodes; all of them are on QNN
    assert list(placed) == ["QNNExecutionProvider"] and placed["QNNExecutionProvider"] >= nodes
    assert sim["runs"]["model_ctx.onnx"]["placement"]["htp_fraction"] == 1.0
    assert q["context"]["placement_when_compiled"]["partitions"] == {"QNNExecutionProvider": 1}
    assert (q["soc_model"], q["htp_arch"]) == (57, 75)
    passes = {p["pass"]: p for p in q["graph_passes"]}
    assert passes["ClampMaskBias"]["modified"] and "-100.0" in passes["ClampMaskBias"]["summary"]
    assert sim["runs"]["model_ctx.onnx"]["accuracy_vs_fp32"]["mean_cosine"] >= 0.99999  # measured 0.9999997


def test_every_node_has_a_precision_and_a_reason(package):
    nodes = package.manifest["precision"]["nodes"]
    assert nodes and all(n["reason"] for n in nodes)
    linear = [n for n in nodes if n["category"] == "linear"]
    assert len(linear) == 12 and {n["precision"] for n in linear} <= {"w8a16", "w16a16"}
    assert all("weight_sqnr_db" in n for n in linear)
    mask = [n for n in nodes if n["category"] == "attention_mask"]
    assert mask and all("float32-minimum bias replaced by -100.0" in n["reason"] for n in mask)


def test_context_model_on_the_simulator_matches_torch_fp32(package, tiny_bert_dir):
    import torch
    from transformers import AutoTokenizer, BertModel

    from edgeq.devices.qnn_htp import run_htp

    tok = AutoTokenizer.from_pretrained(str(package.path))
    enc = [tok([t], padding="max_length", truncation=True, max_length=64, return_tensors="np") for t in TEXTS]
    feeds = [{k: e[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")} for e in enc]
    run = run_htp(package.path / "model_ctx.onnx", feeds, 57, 75)
    model = BertModel.from_pretrained(str(tiny_bert_dir)).eval()
    for f, out in zip(feeds, run.outputs):
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in f.items()}).last_hidden_state.numpy()
        m = f["attention_mask"][..., None]
        a, b = (ref * m).sum(1)[0], (out * m).sum(1)[0]
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) >= 0.99999  # measured 0.9999997


def test_verify_on_qnn_htp_passes_and_catches_a_changed_context(package, tmp_path):
    report = verify(package.path, on="qnn-htp")
    assert report.ok, report.checks
    assert any("100% of nodes on HTP" in d for _n, _ok, d in report.checks)
    copy = tmp_path / package.path.name
    shutil.copytree(package.path, copy)
    data = bytearray((copy / "model_ctx.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model_ctx.onnx").write_bytes(bytes(data))
    bad = verify(copy, on="qnn-htp")
    assert not bad.ok and ("file model_ctx.onnx", False) in [(n, ok) for n, ok, _d in bad.checks]


def test_missing_qnn_wheel_stops_the_export_before_any_work(tiny_bert_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)
    with pytest.raises(DeviceUnavailableError, match="onnxruntime-qnn") as exc:
        export_package(ExportRequest(tiny_bert_dir, "android-qnn-htp", tmp_path / "out"))
    assert "pip install" in exc.value.hint
    assert not list((tmp_path / "out").iterdir())  # the staging folder is gone, nothing written


def test_recorded_precisions_are_the_ones_in_the_qdq_file(package):
    from onnx import TensorProto

    model = onnx.load(str(package.path / "model.onnx"))
    inits = {i.name: i.data_type for i in model.graph.initializer}
    dq = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    by_name = {n.name: n for n in model.graph.node}
    want = {"w8a16": TensorProto.UINT8, "w16a16": TensorProto.INT16, "w16": TensorProto.UINT16}
    checked = 0
    for d in package.manifest["precision"]["nodes"]:
        if d["category"] in ("linear", "embedding"):
            node = by_name[d["name"]]
            table = node.input[0] if d["category"] == "embedding" else node.input[1]
            assert inits[dq[table]] == want[d["precision"]], d["name"]
            checked += 1
    assert checked == 12 + 2  # 12 linear layers, word and token-type embedding tables


def test_verify_on_qnn_htp_refuses_a_package_without_a_context_model(package, tmp_path):
    copy = tmp_path / package.path.name
    shutil.copytree(package.path, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    del manifest["model"]["context_file"]  # what a CPU package's manifest looks like
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserInputError, match="has no EPContext model") as exc:
        verify(copy, on="qnn-htp")
    assert "--profile android-qnn-htp" in exc.value.hint


def test_cli_inspect_shows_htp_placement_and_verify_on_qnn_htp_exits_0(package):
    from click.testing import CliRunner

    from edgeq.cli import main

    shown = CliRunner().invoke(main, ["inspect", str(package.path)])
    assert shown.exit_code == 0, shown.output
    assert "qnn      soc_model 57 (Hexagon v75), model_ctx.onnx:" in shown.output
    assert "nodes on HTP in 1 partition(s), CPU fallback disabled" in shown.output
    checked = CliRunner().invoke(main, ["verify", str(package.path), "--on", "qnn-htp"])
    assert checked.exit_code == 0, checked.output
    assert f"verified {package.path} on qnn-htp" in checked.output
