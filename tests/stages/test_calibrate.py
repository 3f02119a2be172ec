"""edgeq.stages.calibrate: activation ranges of the tiny BERT's linear inputs, and the exact tail percentile."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeq.modelsource import inspect_model_dir
from edgeq.profiles import QuantizationSpec
from edgeq.runtime import embed, encode, session
from edgeq.stages.calibrate import TAIL_KEEP, CalibrationStats, _Tails, calibrate, linear_inputs
from edgeq.stages.export import export
from edgeq.stages.optimize import optimize
from edgeq.textdata import CALIBRATION_FILE, load_texts

N_TEXTS = 16
SEQ_LEN = 64


@pytest.fixture(scope="module")
def optimized(tiny_bert_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("calibrate-work")
    return optimize(export(inspect_model_dir(tiny_bert_dir), work), work)


@pytest.fixture(scope="module")
def tokenizer(optimized):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(optimized.exported.tokenizer_dir), local_files_only=True)


@pytest.fixture(scope="module")
def texts() -> tuple[str, ...]:
    return load_texts(CALIBRATION_FILE).head(N_TEXTS)


def spec(**kw) -> QuantizationSpec:
    return dataclasses.replace(QuantizationSpec(), calibration_seq_len=SEQ_LEN, **kw)


@pytest.fixture(scope="module")
def run(optimized, tokenizer, texts):
    cache: dict[tuple, CalibrationStats] = {}

    def _run(method: str, percentile: float = 99.999) -> CalibrationStats:
        key = (method, percentile)
        if key not in cache:
            s = spec(calibration_method=method, calibration_percentile=percentile)
            cache[key] = calibrate(optimized, tokenizer, texts, s, "mean")
        return cache[key]

    return _run


@pytest.fixture(scope="module")
def real_token_values(optimized, tokenizer, texts) -> dict[str, np.ndarray]:
    """Independent of calibrate(): every linear input's values at real (unpadded) tokens, one run of the batch."""
    model = optimized.load()
    tensors = linear_inputs(optimized, model)
    for t in tensors:
        model.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    sess = session(model)
    feeds = encode(tokenizer, texts, SEQ_LEN, [i.name for i in sess.get_inputs()])
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    mask = feeds["attention_mask"].astype(bool)
    assert not mask.all(), "the batch should hold padding for this check to mean something"
    return {t: values[t][mask].reshape(-1) for t in tensors}


@pytest.mark.encoders
def test_every_linear_input_has_a_range(optimized, run):
    model = optimized.load()
    linear = [n for n in model.graph.node if optimized.nodes[n.name].category == "linear"]
    assert len(linear) == 12
    stats = run("percentile")
    assert set(stats.ranges) == {n.input[0] for n in linear}
    assert len(stats.ranges) == 8  # q/k/v share their input: 4 distinct inputs per layer
    for name, r in stats.ranges.items():
        assert math.isfinite(r.lo) and math.isfinite(r.hi)
        assert r.lo < r.hi, name


@pytest.mark.encoders
def test_stats_record_samples_method_and_reference(optimized, tokenizer, texts, run):
    stats = run("percentile")
    assert stats.samples == N_TEXTS
    assert stats.method == "percentile"
    assert stats.reference.shape == (N_TEXTS, 64)
    expected = embed(session(optimized.exported.onnx_path), tokenizer, texts, SEQ_LEN, "mean")
    np.testing.assert_allclose(stats.reference, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.encoders
def test_calibrate_does_not_change_the_optimized_model_file(optimized, run):
    before = optimized.onnx_path.read_bytes()
    run("minmax", 1.0)  # a fresh calibration run (distinct cache key)
    assert optimized.onnx_path.read_bytes() == before
    assert [o.name for o in onnx.load(str(optimized.onnx_path)).graph.output] == ["last_hidden_state"]


@pytest.mark.encoders
def test_minmax_is_the_extremes_of_real_tokens(run, real_token_values):
    stats = run("minmax")
    for name, v in real_token_values.items():
        assert stats.ranges[name].lo == pytest.approx(float(v.min()), abs=1e-6), name
        assert stats.ranges[name].hi == pytest.approx(float(v.max()), abs=1e-6), name


@pytest.mark.parametrize("percentile", [99.999, 99.0])
@pytest.mark.encoders
def test_percentile_ranges_lie_within_minmax(run, percentile):
    mm = run("minmax").ranges
    pc = run("percentile", percentile).ranges
    assert set(mm) == set(pc)
    for name in mm:
        assert mm[name].lo <= pc[name].lo < pc[name].hi <= mm[name].hi, name
    if percentile == 99.0:  # 1% of >= 10k values per tensor is clipped: every range is strictly narrower
        assert all(pc[n].hi < mm[n].hi and pc[n].lo > mm[n].lo for n in mm)


# --- _Tails --------------------------------------------------------------------------------------------------------


def kth(values: np.ndarray, percentile: float) -> tuple[float, float, int]:
    """k-th smallest and k-th largest for k = ceil(n * (100 - p) / 100), the rule _Tails implements, computed in
    exact rational arithmetic (percentile given as its decimal string, as written in the profile)."""
    n = values.size
    k = max(1, math.ceil(Fraction(n) * (100 - Fraction(str(percentile))) / 100))
    s = np.sort(values)
    return float(s[k - 1]), float(s[-k]), k




@pytest.mark.parametrize(
    "percentile",
    [99.9, 99.95, 99.999, 99.99, 99.0],
)
@pytest.mark.parametrize("chunks", [1, 7])
def test_tails_percentile_is_exact(percentile, chunks):
    rng = np.random.default_rng(2024)
    v = np.concatenate([rng.standard_normal(99_000), rng.standard_t(2, 1_000) * 10]).astype(np.float32)
    rng.shuffle(v)
    assert v.size == 100_000
    tails = _Tails()
    for part in np.array_split(v, chunks):  # several calibration batches
        tails.add(part)
    lo, hi, k = kth(v, percentile)
    assert k <= TAIL_KEEP
    r = tails.range("percentile", percentile)
    assert (r.lo, r.hi) == (lo, hi), f"k={k}"


def test_tails_minmax_is_exact():
    rng = np.random.default_rng(5)
    v = rng.standard_normal(100_000).astype(np.float32) * 3
    tails = _Tails()
    for part in np.array_split(v, 10):
        tails.add(part)
    r = tails.range("minmax", 99.999)
    assert (r.lo, r.hi) == (float(v.min()), float(v.max()))
    assert tails.count == v.size
    assert tails.top.size == tails.bottom.size == TAIL_KEEP


def test_tails_with_fewer_values_than_kept():
    v = np.array([3.0, -1.0, 7.0, 0.5, -4.0], np.float32)
    tails = _Tails()
    tails.add(v[:2])
    tails.add(v[2:])
    assert (tails.range("minmax", 0).lo, tails.range("minmax", 0).hi) == (-4.0, 7.0)
    r = tails.range("percentile", 99.999)  # k = 1: the extremes
    assert (r.lo, r.hi) == (-4.0, 7.0)
    r = tails.range("percentile", 60.0)  # k = ceil(5 * 0.4) = 2
    assert (r.lo, r.hi) == (-1.0, 3.0)


# --- per-token zero points and smoothing --------------------------------------------------------------------------


@pytest.mark.encoders
def test_every_input_gets_a_per_token_zero_point_and_smoothed_ranges_are_of_the_smoothed_tokens(
        optimized, tokenizer, texts, run, real_token_values):
    """minmax (exact): a smoothed input's range is the extremes of its real tokens times 1/t per channel."""
    stats = calibrate(optimized, tokenizer, texts, spec(calibration_method="minmax", smoothing=True), "mean")
    assert set(stats.token_quant) == set(stats.ranges)
    assert all(1 <= tq.z <= 254 and (tq.floor is None or tq.floor <= 0) for tq in stats.token_quant.values())
    assert set(stats.smoothing) == set(stats.smoothed_ranges) and set(stats.smoothing) <= set(stats.ranges)
    assert stats.smoothing, "the tiny BERT's inputs should have a smoothing that lowers the sampled error"
    for name, s in stats.smoothing.items():
        rows = real_token_values[name].reshape(-1, s.inv_scale.size) * s.inv_scale
        assert stats.smoothed_ranges[name].lo == pytest.approx(float(rows.min()), abs=1e-6), name
        assert stats.smoothed_ranges[name].hi == pytest.approx(float(rows.max()), abs=1e-6), name
        assert s.error < s.error_unsmoothed
    assert run("minmax").smoothing == {}  # off by default
