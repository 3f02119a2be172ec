"""Budget verdicts (edgeq/stages/budget.py): None at the bar, an error naming the numbers and the fix below it."""

import dataclasses
import math

import pytest

from edgeq.errors import AccuracyBudgetError, SizeBudgetError
from edgeq.llm.evaluate import LMAccuracy
from edgeq.metrics import EncoderAccuracy
from edgeq.profiles import load_profile
from edgeq.stages.budget import lm_accuracy_error, lm_size_error, over_size_ratio, qnn_accuracy_error, qnn_size_error
from edgeq.stages.remedy import size_limit_setting


@pytest.fixture(scope="module")
def qnn_profile():
    return load_profile("android-qnn-htp")


def at_bars(profile) -> EncoderAccuracy:
    b = profile.accuracy
    return EncoderAccuracy(b.min_mean_cosine, b.min_min_cosine, b.min_retrieval_top1, samples=32)


def htp_runs(mean_cosine: float, htp_fraction: float) -> dict:
    return {"model_ctx.onnx": {"placement": {"htp_fraction": htp_fraction},
                               "accuracy_vs_fp32": {"mean_cosine": mean_cosine}}}


SIZE = {"model_bytes": 38_700_000, "fp32_onnx_bytes": 90_400_000, "ratio": 0.4281, "max_ratio": 0.45, "checked": True}


def test_qnn_accuracy_at_the_bars_passes(qnn_profile):
    acc = at_bars(qnn_profile)
    assert qnn_accuracy_error(qnn_profile, acc, htp_runs(acc.mean_cosine, 1.0), promoted=3, size=SIZE) is None


def test_qnn_accuracy_names_every_failed_row_and_nan_fails(qnn_profile):
    acc = at_bars(qnn_profile)
    err = qnn_accuracy_error(qnn_profile, acc, htp_runs(math.nan, 0.9), promoted=3, size=SIZE)
    assert isinstance(err, AccuracyBudgetError)
    assert "mean cosine on the HTP simulator (model_ctx.onnx) nan" in err.message
    assert "HTP node share (model_ctx.onnx) 0.900000 < 1.0" in err.message
    assert "3 linear layers had" in err.message
    # all gated metrics and the size, and settings as typed
    assert "All gated metrics: mean cosine 0.990000 (bar 0.99), min cosine" in err.message
    assert "model.onnx 38,700,000 B = 42.8097% of the FP32 export's 90,400,000 B" in err.message
    assert err.hint.startswith("--set qnn.sensitivity_target_mean_cosine=0.999 ")
    assert "--set qnn.seq_len=128" in err.hint


def test_size_ratio_is_compared_in_bytes_and_counts_only_when_checked():
    size = {"model_bytes": 9_000_000, "fp32_onnx_bytes": 10_000_000, "ratio": 0.9, "max_ratio": 0.5, "checked": True}
    assert over_size_ratio(size)
    assert not over_size_ratio({**size, "checked": False})
    with pytest.raises(SizeBudgetError, match=r"^model.onnx 9,000,000 B = 90.0000% of the FP32 export's 10,000,000 B "
                                              r"\(package.max_size_ratio = 0.5: at most 5,000,000 B\)"):
        raise qnn_size_error(size)
    assert qnn_size_error(size).hint.startswith("--set package.max_size_ratio=0.9000 ")
    # issue 17: 40.03% printed as "40.0%" next to "allows 40%" read as a contradiction; bytes decide, and are shown
    edge = {"model_bytes": 36_212_345, "fp32_onnx_bytes": 90_461_234, "ratio": 0.4003, "max_ratio": 0.4,
            "checked": True}
    assert over_size_ratio(edge)
    assert not over_size_ratio({**edge, "model_bytes": 36_184_493})  # 0.4 x 90,461,234 = 36,184,493.6
    assert over_size_ratio({**edge, "model_bytes": 36_184_494})
    msg = qnn_size_error(edge).message
    assert "36,212,345 B = 40.0308% of the FP32 export's 90,461,234 B" in msg and "at most 36,184,493 B" in msg
    assert size_limit_setting(edge) == "package.max_size_ratio=0.4004"


def test_lm_budget_names_perplexity_agreement_and_what_to_try():
    spec = load_profile("android-arm64").llm
    good = LMAccuracy(perplexity=10.0, ref_perplexity=10.0, ppl_increase=0.0, mean_kl=0.0, top1_agreement=1.0, tokens=512)
    assert lm_accuracy_error(good, spec) is None
    bad = LMAccuracy(perplexity=20.0, ref_perplexity=10.0, ppl_increase=1.0, mean_kl=0.5, top1_agreement=0.1, tokens=512)
    err = lm_accuracy_error(bad, spec, size=134_700_123, bits_per_weight=5.82)
    assert err is not None and "perplexity increase +100.0000% > +6.0000%" in err.message
    assert "perplexity 20.0000 vs FP32 10.0000" in err.message and "mean KL 0.500000" in err.message
    assert f"top-1 agreement 0.100000 < {spec.min_top1_agreement}" in err.message
    assert "the model is 134,700,123 B, its linear layers 5.8200 bits per weight (bar 6.5)" in err.message
    assert err.hint.startswith("try --set ") and "--set llm.promote=1 " in err.hint


def test_lm_size_budget_is_bits_per_weight_and_an_optional_absolute_cap():
    spec = load_profile("android-arm64").llm
    assert spec.max_size_mb == 0 and spec.max_bits_per_weight == 6.5  # no cap: a 7B model fits by default
    assert lm_size_error(10**12, 6.5, spec) is None
    with pytest.raises(SizeBudgetError, match=r"store 6\.500100 bits per weight, over the profile's 6.5 "):
        raise lm_size_error(1, 6.5001, spec)
    assert "--set llm.max_bits_per_weight=6.51 " in lm_size_error(1, 6.5001, spec).hint
    capped = dataclasses.replace(spec, max_size_mb=150.0)
    assert lm_size_error(150_000_000, 5.0, capped) is None
    err = lm_size_error(150_000_001, 6.6, capped)
    # both reasons, with the unrounded numbers compared, and the settings to type
    assert "6.600000 bits per weight" in err.message and "150,000,001 B (150.000001 MB), over the profile's 150 MB " \
        "(150,000,000 B" in err.message and "--set llm.promote=0" in err.hint
    assert "--set llm.max_bits_per_weight=6.6 --max-size-mb 150.01 " in err.hint
