"""edgeq.stages.remedy: the closest passing setting after a failed gate, over made-up measurements (the real chain
runs in tests/recipes/test_encoder_cpu.py and, on a MiniLM fine-tune, tests/test_finetune_slow.py; the causal-LM one
in tests/recipes/test_causal_lm.py)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from edgeq.metrics import EncoderAccuracy
from edgeq.policy import promotion_count
from edgeq.policy.encoder import promotion_steps, within_size_budget
from edgeq.profiles import load_profile
from edgeq.stages.budget import measured
from edgeq.stages.remedy import (MAX_LM_TRIALS, closest_fix, first_passing, floored, landing, settings_for,
                                size_limit_setting, with_setting)

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
    """android-arm64 with the selection targets these made-up tables are written for (the bundled ones may move)."""
    p = with_setting(load_profile("android-arm64"), "quantization.sensitivity_target_mean_cosine", 0.998)
    return with_setting(p, "quantization.sensitivity_target_min_cosine", 0.99)


def size(k: int, over: frozenset[int] = frozenset()) -> dict:
    """Each promoted layer adds its block scales; the counts in ``over`` are made 36,500,000 B (over 40%)."""
    model = 36_500_000 if k in over else 35_000_000 + 70_000 * k
    return {"model_bytes": model, "fp32_onnx_bytes": FP32_BYTES, "ratio": round(model / FP32_BYTES, 4),
            "max_ratio": 0.4, "checked": True}


class Builds:
    """measure(k) and size_of(k) of the recipe: the package with k promoted passes the accuracy gate iff k in
    ``passing``; records what was built."""

    def __init__(self, passing: set[int], over: set[int] = frozenset()) -> None:
        self.passing, self.over = passing, frozenset(over)
        self.asked: list[int] = []

    def size(self, k: int) -> dict:
        return size(k, self.over)

    def measure(self, k: int):
        self.asked.append(k)
        acc = EncoderAccuracy(0.998, 0.99, 0.96 if k in self.passing else 0.946875, 320)
        return measured(k, acc, self.size(k), load_profile("android-arm64"))


def failed_at(k: int, profile, over: set[int] = frozenset()):
    return measured(k, EncoderAccuracy(0.998, 0.99, 0.946875, 320), size(k, frozenset(over)), profile)


def fix_for(table: Table, base, builds: Builds, profile):
    return closest_fix(table, base, builds.measure, builds.size, profile)


def test_a_package_over_size_only_needs_the_limit_its_bytes_take(profile):
    base = measured(8, EncoderAccuracy(0.998, 0.99, 0.97, 320), {**size(8), "model_bytes": 36_212_345}, profile)
    assert base.over_size and not base.accuracy_failures
    builds = Builds(set())
    fix = fix_for(calibration(), base, builds, profile)
    assert fix.settings == ("package.max_size_ratio=0.4024",) and fix.measured is base
    assert builds.asked == []  # nothing else is built
    assert 0.4024 * FP32_BYTES >= 36_212_345 > 0.4023 * FP32_BYTES


def test_size_limit_is_rounded_up_never_down():
    for model in (36_000_000, 36_000_001, 36_009_000, 36_009_001):
        setting = size_limit_setting({"model_bytes": model, "fp32_onnx_bytes": FP32_BYTES})
        ratio = float(setting.split("=")[1])
        assert ratio * FP32_BYTES >= model and (ratio - 1e-4) * FP32_BYTES < model, setting


def test_accuracy_failure_names_the_target_that_stops_the_search_at_the_first_passing_count(profile):
    table = calibration()
    first = promotion_count(N, table.score, profile)[-1].promoted
    assert first == 8  # mean cosine 0.99829 is the first over 0.998
    base = failed_at(first, profile)
    assert base.accuracy_failures == ("retrieval top-1 agreement 0.946875 < 0.95",)
    builds = Builds(passing={12, 16})
    fix = fix_for(table, base, builds, profile)
    assert builds.asked == [10, 12]  # upward from the failed count, stopping at the first that passes
    assert fix.measured.promoted == 12 and not fix.measured.over_size
    key, value = fix.settings[0].split("=")
    assert len(fix.settings) == 1 and key == "quantization.sensitivity_target_mean_cosine"
    # the fewest decimals that land the search exactly on 12
    assert value == "0.999" and float(value) == floored(table.rows[12][0], 3)
    assert table.rows[10][0] < 0.999 <= table.rows[12][0]
    raised = with_setting(profile, key, 0.999)
    assert promotion_count(N, table.score, raised)[-1].promoted == 12
    assert landing(table, builds.size, raised) == 12 and landing(table, builds.size, profile) == 8


def test_the_passing_count_over_the_size_budget_needs_the_limit_too(profile):
    table = calibration()
    fix = fix_for(table, failed_at(8, profile), Builds(passing={16}, over={16}), profile)
    assert fix.measured.promoted == 16 and fix.measured.over_size
    # 0.999 would stop at 12; 36,500,000 B of 90,000,000 B
    assert fix.settings == ("quantization.sensitivity_target_mean_cosine=0.9995", "package.max_size_ratio=0.4056")


def test_the_size_budget_cuts_the_search_short_and_the_limit_alone_undoes_it(profile):
    """The targets ask for 8, over the budget: the export packages 6 (the most that fits), which fails held back;
    8 passes, and a size limit that admits it is the one setting needed."""
    table = calibration()
    builds = Builds(passing={8}, over={8, 10, 12, 16, 20, 24, 32, 36})
    assert within_size_budget(8, N, lambda k: not builds.size(k)["model_bytes"] > 0.4 * FP32_BYTES)[0] == 6
    base = failed_at(6, profile)
    fix = fix_for(table, base, builds, profile)
    assert fix.settings == ("package.max_size_ratio=0.4056",) and fix.measured.promoted == 8
    assert landing(table, builds.size, with_setting(profile, "package.max_size_ratio", 0.4056)) == 8


def test_when_mean_cosine_cannot_land_there_another_target_does(profile):
    """Mean cosine that stops rising (10 and 12 alike): raising it lands on 10, which fails held back; a retrieval
    target that only 12 meets lands on 12."""
    table = calibration(top1={10: 0.9609, 12: 0.984375})
    table.rows[12] = (table.rows[10][0], 0.995, 0.984375)
    fix = fix_for(table, failed_at(8, profile), Builds(passing={12}), profile)
    assert fix.settings == ("quantization.sensitivity_target_retrieval_top1=0.984",)
    assert fix.measured.promoted == 12


def test_no_setting_reaches_a_count_whose_calibration_scores_fall_behind(profile):
    table = calibration(top1={12: 0.96})
    table.rows[12] = (table.rows[10][0] - 1e-5, 0.995, 0.96)  # nothing at 12 beats 10: no target stops there
    builds = Builds(passing={12, 16})
    assert settings_for(table, 12, builds.size, profile) is None
    fix = fix_for(table, failed_at(8, profile), builds, profile)
    assert fix.measured.promoted == 16 and builds.asked == [10, 12, 16]


def test_no_fix_when_no_count_passes(profile):
    builds = Builds(passing=set())
    assert fix_for(calibration(), failed_at(8, profile), builds, profile) is None
    assert builds.asked == [k for k in STEPS if k > 8]
    # with every layer promoted already, there is nothing to try
    assert fix_for(calibration(), failed_at(N, profile), Builds(set()), profile) is None


# --------------------------------------------------------------------- causal LMs: the first setting that passes


@dataclass(frozen=True)
class Setting:
    setting: str


def test_first_passing_builds_in_order_and_stops_at_the_first_that_passes(profile):
    built = []

    def measure(c: Setting):
        built.append(c.setting)
        return failed_at(8, profile) if c.setting != "b=1" else measured(8, EncoderAccuracy(1, 1, 1, 320), size(8),
                                                                          profile)

    search = first_passing([Setting("a=1"), Setting("b=1"), Setting("c=1")], measure)
    assert built == ["a=1", "b=1"] and search.fix.settings == ("b=1",) and search.untried == ("c=1",)
    assert [t.settings for t in search.tried] == [("a=1",), ("b=1",)]


def test_first_passing_builds_at_most_its_limit():
    calls = []
    search = first_passing([Setting(f"k={i}") for i in range(7)],
                           lambda c: calls.append(c) or failed_at(8, load_profile("android-arm64")))
    assert len(calls) == MAX_LM_TRIALS == 4 and search.fix is None
    assert search.untried == ("k=4", "k=5", "k=6")
