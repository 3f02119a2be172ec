"""edgeq.stages.remedy: the closest passing setting after a failed gate, over made-up measurements (the real chain
runs in tests/recipes/test_encoder_cpu.py and, on a MiniLM fine-tune, tests/test_finetune_slow.py)."""

from __future__ import annotations

import pytest

from edgeq.metrics import EncoderAccuracy
from edgeq.policy import promotion_count, selection_targets
from edgeq.policy.encoder import promotion_steps, with_target
from edgeq.profiles import load_profile
from edgeq.stages.budget import measured
from edgeq.stages.remedy import closest_fix, floored, size_limit_setting, target_setting

N = 36
STEPS = promotion_steps(N)  # 0 1 2 3 4 6 8 10 12 16 20 24 32 36
FP32_BYTES = 90_000_000


class Table:
    """Calibration-text accuracy per promotion count; records what was asked (Candidates' interface)."""

    def __init__(self, rows: dict[int, tuple[float, float, float]]) -> None:
        self.n = N
        self.rows = rows
        self.asked: list[int] = []

    def score(self, k: int) -> EncoderAccuracy:
        self.asked.append(k)
        return EncoderAccuracy(*self.rows[k], samples=128)


def calibration(top1: dict[int, float] | None = None) -> Table:
    """Mean cosine rising with every promotion (0.99374, ..., 0.99829 at 8, 0.99877 at 10, 0.99911 at 12, 0.99954
    at 16), min cosine 0.995, retrieval top-1 0.97 unless given."""
    return Table({k: (1 - 0.00626 * 0.85 ** k, 0.995, (top1 or {}).get(k, 0.97)) for k in STEPS})


@pytest.fixture(scope="module")
def profile():
    return load_profile("android-arm64")


def size(k: int) -> dict:
    model = 35_000_000 + 70_000 * k  # each promoted layer adds its block scales
    return {"model_bytes": model, "fp32_onnx_bytes": FP32_BYTES, "ratio": round(model / FP32_BYTES, 4),
            "max_ratio": 0.4, "checked": True}


def held_back(passing: set[int], over_size: set[int] = frozenset()):
    """measure(k): the package with k promoted passes the accuracy gate iff k in ``passing``."""
    asked = []

    def measure(k: int):
        asked.append(k)
        acc = EncoderAccuracy(0.998, 0.99, 0.96 if k in passing else 0.946875, 320)
        s = size(k) if k not in over_size else {**size(k), "model_bytes": 36_500_000}
        return measured(k, acc, s, load_profile("android-arm64"))

    measure.asked = asked
    return measure


def test_a_package_over_size_only_needs_the_limit_its_bytes_take(profile):
    base = measured(8, EncoderAccuracy(0.998, 0.99, 0.97, 320), {**size(8), "model_bytes": 36_212_345}, profile)
    assert base.over_size and not base.accuracy_failures
    measure = held_back(set())
    fix = closest_fix(calibration(), base, measure, profile)
    assert fix.settings == ("package.max_size_ratio=0.4024",) and fix.measured is base
    assert measure.asked == []  # nothing else is built
    assert 0.4024 * FP32_BYTES >= 36_212_345 > 0.4023 * FP32_BYTES


def test_size_limit_is_rounded_up_never_down():
    for model in (36_000_000, 36_000_001, 36_009_000, 36_009_001):
        setting = size_limit_setting({"model_bytes": model, "fp32_onnx_bytes": FP32_BYTES})
        ratio = float(setting.split("=")[1])
        assert ratio * FP32_BYTES >= model and (ratio - 1e-4) * FP32_BYTES < model, setting


def test_accuracy_failure_names_the_target_that_stops_the_search_at_the_first_passing_count(profile):
    table = calibration()
    first = promotion_count(N, table.score, profile)[-1].promoted
    assert first == 8  # mean cosine 0.99895 is the first over 0.998
    base = measured(first, EncoderAccuracy(0.998, 0.99, 0.946875, 320), size(first), profile)
    assert base.accuracy_failures == ("retrieval top-1 agreement 0.946875 < 0.95",)
    measure = held_back(passing={12, 16})
    fix = closest_fix(table, base, measure, profile)
    assert measure.asked == [10, 12]  # upward from the failed count, stopping at the first that passes
    assert fix.measured.promoted == 12 and not fix.measured.over_size
    key, value = fix.settings[0].split("=")
    assert len(fix.settings) == 1 and key == "quantization.sensitivity_target_mean_cosine"
    # the fewest decimals that land the search exactly on 12
    assert value == "0.999" and float(value) == floored(table.rows[12][0], 3)
    assert table.rows[10][0] < 0.999 <= table.rows[12][0]
    mean = selection_targets(profile)[0]
    assert promotion_count(N, table.score, with_target(profile, mean, 0.999))[-1].promoted == 12


def test_the_passing_count_over_the_size_budget_needs_the_limit_too(profile):
    table = calibration()
    base = measured(8, EncoderAccuracy(0.998, 0.99, 0.946875, 320), size(8), profile)
    fix = closest_fix(table, base, held_back(passing={16}, over_size={16}), profile)
    assert fix.measured.promoted == 16 and fix.measured.over_size
    assert fix.settings[0] == "quantization.sensitivity_target_mean_cosine=0.9995"  # 0.999 would stop at 12
    assert fix.settings[1] == "package.max_size_ratio=0.4056"  # 36,500,000 B of 90,000,000 B


def test_when_mean_cosine_cannot_land_there_another_target_does(profile):
    """Mean cosine that stops rising (10 and 12 alike): raising it lands on 10, which fails held back; a retrieval
    target that only 12 meets lands on 12."""
    table = calibration(top1={10: 0.9609, 12: 0.984375})
    table.rows[12] = (table.rows[10][0], 0.995, 0.984375)
    base = measured(8, EncoderAccuracy(0.998, 0.99, 0.946875, 320), size(8), profile)
    fix = closest_fix(table, base, held_back(passing={12}), profile)
    assert fix.settings == ("quantization.sensitivity_target_retrieval_top1=0.984",)
    assert fix.measured.promoted == 12


def test_no_target_reaches_a_count_whose_calibration_scores_fall_behind(profile):
    table = calibration(top1={12: 0.96})
    table.rows[12] = (table.rows[10][0] - 1e-5, 0.995, 0.96)  # nothing at 12 beats 10: no target stops there
    assert target_setting(table, 12, profile) is None
    base = measured(8, EncoderAccuracy(0.998, 0.99, 0.946875, 320), size(8), profile)
    measure = held_back(passing={12, 16})
    fix = closest_fix(table, base, measure, profile)
    assert fix.measured.promoted == 16 and measure.asked == [10, 12, 16]


def test_no_fix_when_no_count_passes(profile):
    base = measured(8, EncoderAccuracy(0.998, 0.99, 0.946875, 320), size(8), profile)
    measure = held_back(passing=set())
    assert closest_fix(calibration(), base, measure, profile) is None
    assert measure.asked == [k for k in STEPS if k > 8]
    # with every layer promoted already, there is nothing to try
    last = measured(N, EncoderAccuracy(0.998, 0.99, 0.946875, 320), size(N), profile)
    assert closest_fix(calibration(), last, held_back(set()), profile) is None
