"""evaluate_lm on a hand-built ONNX "LM" (logits = embedding[ids] @ W_out): exact numbers against numpy."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.errors import CalibrationDataError
from edgeq.llm.evaluate import ReferenceLogits, evaluate_lm, log_softmax, token_windows, ppl_increase_interval

VOCAB, HIDDEN, SEQ = 50, 8, 24


def bigram_lm(seed: int, noise: float = 0.0) -> tuple[onnx.ModelProto, np.ndarray]:
    """An ONNX model with a causal LM's inputs whose logits at t depend on token t only; returns it and its table."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    out = rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32)
    out += noise * np.random.default_rng(99).standard_normal(out.shape).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"]),
             helper.make_node("MatMul", ["h", "out"], ["logits"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, [1, "s"])
              for n in ("input_ids", "attention_mask", "position_ids")]
    g = helper.make_graph(nodes, "bigram", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(out, "out")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return model, emb @ out


def windows(n: int = 3) -> np.ndarray:
    return np.random.default_rng(1).integers(0, VOCAB, (n, SEQ)).astype(np.int64)


def numpy_metrics(ref_table: np.ndarray, q_table: np.ndarray, w: np.ndarray) -> tuple[float, float, float, float]:
    lp = log_softmax(ref_table[w[:, :-1]])
    lq = log_softmax(q_table[w[:, :-1]])
    t = w[:, 1:]
    nll_q = -np.take_along_axis(lq, t[..., None], -1).mean()
    nll_p = -np.take_along_axis(lp, t[..., None], -1).mean()
    kl = (np.exp(lp) * (lp - lq)).sum(-1).mean()
    top1 = (lp.argmax(-1) == lq.argmax(-1)).mean()
    return float(np.exp(nll_q)), float(np.exp(nll_p)), float(kl), float(top1)


@pytest.mark.parametrize("cached", [False, True])
def test_identical_models_give_zero_increase_and_kl(cached, tmp_path):
    model, _ = bigram_lm(0)
    w = windows()
    if cached:
        with ReferenceLogits(model, w, tmp_path / "ref") as ref:
            acc = evaluate_lm(model, ref, w)
    else:
        acc = evaluate_lm(model, model, w)
    assert acc.tokens == 3 * (SEQ - 1)
    # the reference on disk is float32 log-probs: their rounding (~1e-7 relative) is all that may differ
    assert acc.ppl_increase == pytest.approx(0.0, abs=1e-6)
    assert acc.mean_kl == pytest.approx(0.0, abs=1e-6)
    assert acc.top1_agreement == 1.0
    assert acc.perplexity == pytest.approx(acc.ref_perplexity, rel=1e-6)


def test_metrics_equal_numpy(tmp_path):
    ref_model, ref_table = bigram_lm(0)
    q_model, q_table = bigram_lm(0, noise=0.3)
    w = windows()
    ppl, ref_ppl, kl, top1 = numpy_metrics(ref_table, q_table, w)
    with ReferenceLogits(ref_model, w, tmp_path / "ref") as ref:
        acc = evaluate_lm(q_model, ref, w)
    assert acc.perplexity == pytest.approx(ppl, rel=1e-5)
    assert acc.ref_perplexity == pytest.approx(ref_ppl, rel=1e-5)
    assert acc.ppl_increase == pytest.approx(ppl / ref_ppl - 1, rel=1e-4)
    assert acc.mean_kl == pytest.approx(kl, rel=1e-4)
    assert acc.top1_agreement == pytest.approx(top1)
    assert 0 < acc.mean_kl and acc.top1_agreement < 1  # the perturbation is visible


def test_reference_files_are_removed_and_windows_checked():
    model, _ = bigram_lm(0)
    w = windows()
    ref = ReferenceLogits(model, w)
    files = list(ref.directory.glob("*.npy"))
    assert len(files) == 3 and ref.logprobs(0).shape == (SEQ, VOCAB)
    with pytest.raises(ValueError, match="other windows"):
        evaluate_lm(model, ref, w[:2])
    ref.close()
    assert not any(f.exists() for f in files)


class FakeTokenizer:
    def __call__(self, text, add_special_tokens=True, verbose=True):
        return {"input_ids": [ord(c) for c in text]}


def test_token_windows():
    w = token_windows(FakeTokenizer(), ["abc", "de"], seq_len=3)  # "abc\n\nde": 7 tokens -> 2 whole windows
    assert w.dtype == np.int64 and w.tolist() == [[97, 98, 99], [10, 10, 100]]
    assert token_windows(FakeTokenizer(), ["abcdefgh"], seq_len=2, max_windows=3).shape == (3, 2)
    with pytest.raises(CalibrationDataError):
        token_windows(FakeTokenizer(), ["ab"], seq_len=3)


def test_interval_brackets_the_increase_and_is_the_bootstrap_of_window_sums(tmp_path):
    ref_model, _ = bigram_lm(0)
    q_model, _ = bigram_lm(0, noise=0.3)
    w = windows()
    with ReferenceLogits(ref_model, w, tmp_path / "ref") as ref:
        acc = evaluate_lm(q_model, ref, w)
    lo, hi = acc.ppl_increase_interval
    assert lo <= acc.ppl_increase <= hi and lo < hi


def test_interval_by_hand():
    # two windows of 10 tokens: increases exp(0.1) - 1 and exp(0.3) - 1; resamples mix them, nothing outside
    per_window = np.array([[11.0, 10.0, 10], [13.0, 10.0, 10]])
    lo, hi = ppl_increase_interval(per_window)
    assert lo == pytest.approx(np.exp(0.1) - 1) and hi == pytest.approx(np.exp(0.3) - 1)
    # identical windows: no spread; one window: no interval at all
    assert ppl_increase_interval(np.array([[11.0, 10.0, 10]] * 4)) == pytest.approx((np.exp(0.1) - 1,) * 2)
    assert ppl_increase_interval(per_window[:1]) is None


def test_reference_rows_read_from_the_file_equal_the_mapped_window(tmp_path):
    rng = np.random.default_rng(3)
    windows = rng.integers(0, 50, (2, 9))
    lps = [rng.standard_normal((9, 50)).astype(np.float32) for _ in windows]
    with ReferenceLogits.from_logprobs(windows, lps, tmp_path / "ref") as ref:
        for i in range(2):
            for start, stop in [(0, 4), (4, 8), (8, 9), (5, 20)]:
                np.testing.assert_array_equal(ref.rows(i, start, stop), lps[i][start:stop])
