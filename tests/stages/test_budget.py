"""Budget verdicts (edgeq/stages/budget.py): None at the bar, an error naming the numbers and the fix below it."""

import dataclasses
import math

import pytest

from edgeq.errors import AccuracyBudgetError, SizeBudgetError
from edgeq.llm.evaluate import LMAccuracy
from edgeq.metrics import EncoderAccuracy
from edgeq.profiles import load_profile
from edgeq.stages.budget import lm_accuracy_error, lm_size_error, over_size_ratio, qnn_accuracy_error, qnn_size_error


@pytest.fixture(scope="module")
def qnn_profile():
    return load_profile("android-qnn-htp")


def at_bars(profile) -> EncoderAccuracy:
    b = profile.accuracy
    return EncoderAccuracy(b.min_mean_cosine, b.min_min_cosine, b.min_retrieval_top1, samples=32)


def htp_runs(mean_cosine: float, htp_fraction: float) -> dict:
    return {"model_ctx.onnx": {"placement": {"htp_fraction": htp_fraction},
                               "accuracy_vs_fp32": {"mean_cosine": mean_cosine}}}


def test_qnn_accuracy_at_the_bars_passes(qnn_profile):
    acc = at_bars(qnn_profile)
    assert qnn_accuracy_error(qnn_profile, acc, htp_runs(acc.mean_cosine, 1.0), promoted=3) is None


def test_qnn_accuracy_names_every_failed_row_and_nan_fails(qnn_profile):
    acc = at_bars(qnn_profile)
    err = qnn_accuracy_error(qnn_profile, acc, htp_runs(math.nan, 0.9), promoted=3)
    assert isinstance(err, AccuracyBudgetError)
    assert "mean cosine on the HTP simulator (model_ctx.onnx) nan" in err.message
    assert "HTP node share (model_ctx.onnx) 0.9000 < 1.0" in err.message
    assert "3 linear layers had" in err.message and "qnn.sensitivity_target_mean_cosine" in err.hint


def test_size_ratio_counts_only_when_checked():
    size = {"model_bytes": 9_000_000, "fp32_onnx_bytes": 10_000_000, "ratio": 0.9, "max_ratio": 0.5, "checked": True}
    assert over_size_ratio(size)
    assert not over_size_ratio({**size, "checked": False})
    with pytest.raises(SizeBudgetError, match=r"model.onnx is 90.0% of the FP32 export; the profile allows 50%"):
        raise qnn_size_error(size)


def test_lm_budget_names_perplexity_agreement_and_what_to_try():
    spec = load_profile("android-arm64").llm
    good = LMAccuracy(perplexity=10.0, ref_perplexity=10.0, ppl_increase=0.0, mean_kl=0.0, top1_agreement=1.0, tokens=512)
    assert lm_accuracy_error(good, spec) is None
    bad = LMAccuracy(perplexity=20.0, ref_perplexity=10.0, ppl_increase=1.0, mean_kl=0.5, top1_agreement=0.1, tokens=512)
    err = lm_accuracy_error(bad, spec)
    assert err is not None and "perplexity 20.00 vs FP32 10.00 (+100.0%" in err.message
    assert f"top-1 agreement 0.100 < {spec.min_top1_agreement}" in err.message and "(--set KEY=VALUE)" in err.hint


def test_lm_size_budget_is_bits_per_weight_and_an_optional_absolute_cap():
    spec = load_profile("android-arm64").llm
    assert spec.max_size_mb == 0 and spec.max_bits_per_weight == 6.5  # no cap: a 7B model fits by default
    assert lm_size_error(10**12, 6.5, spec) is None
    with pytest.raises(SizeBudgetError, match=r"store 6\.5001 bits per weight, over the profile's 6.5$"):
        raise lm_size_error(1, 6.5001, spec)
    capped = dataclasses.replace(spec, max_size_mb=150.0)
    assert lm_size_error(150_000_000, 5.0, capped) is None
    err = lm_size_error(150_000_001, 6.6, capped)
    # both reasons, with the unrounded numbers compared, and the settings to type
    assert "6.6000 bits per weight" in err.message and "150000001 bytes (150.000 MB), over the profile's 150 MB" \
        in err.message and "--set llm.promote=0" in err.hint
