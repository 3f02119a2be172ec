"""bench/runs.py: the interleaved run order, the outlier rule and the summary every bench speed figure goes through."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from runs import Spread, outliers, run_interleaved, schedule, summarize  # noqa: E402


def test_schedule_is_round_robin_and_rotates_who_goes_first():
    order = list(schedule(["a", "b", "c"], 3))
    assert order == [(0, "a"), (0, "b"), (0, "c"), (1, "b"), (1, "c"), (1, "a"), (2, "c"), (2, "a"), (2, "b")]
    # over n rounds every variant takes every place in its round once
    places = {name: sorted(i % 3 for i, (_, n) in enumerate(order) if n == name) for name in "abc"}
    assert places == {"a": [0, 1, 2], "b": [0, 1, 2], "c": [0, 1, 2]}


def test_the_stalled_llamacpp_run_of_issue_15_is_dropped_and_the_fast_one_kept():
    s = summarize([179.6, 222.0, 0.4], rate=True)  # decode tok/s: times 5.57, 4.50, 2244 ms
    assert s == Spread(median=pytest.approx(200.8), low=179.6, high=222.0, kept=2, dropped=1)


@pytest.mark.parametrize("times, dropped", [
    ([10.0, 10.1, 10.9], [False, False, False]),  # within 9% of the median: never an outlier (the 3% floor)
    ([10.0, 10.0, 10.95], [False, False, True]),  # 9.5% off with no other spread
    ([10.0, 11.0, 12.0, 13.0, 30.0], [False, False, False, False, True]),  # MAD 1, sd 1.48: 18 off is out
    ([10.0, 11.0, 12.0, 13.0, 16.0], [False] * 5),  # 4 off: within 3 x 1.48
    ([5.0, 100.0], [False, False]),  # two runs cannot say which one is off
])
def test_outlier_rule(times, dropped):
    assert outliers(times) == dropped


def test_a_run_that_made_no_progress_is_dropped():
    assert summarize([100.0, 101.0, 0.0], rate=True) == Spread(100.5, 100.0, 101.0, 2, 1)


def test_dropped_runs_are_rerun_in_extra_rounds_up_to_the_limit():
    values = {"a": iter([100.0, 101.0, 1.0, 102.0]), "b": iter([50.0, 51.0, 52.0])}
    calls = []

    def run_one(r, name):
        calls.append((r, name))
        return {"decode_tok_s": next(values[name])}

    runs = run_interleaved(["a", "b"], 3, run_one)
    assert calls == [(0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"), (2, "b"), (3, "a")]  # one rerun, of "a"
    assert runs["a"]["decode_tok_s"] == [100.0, 101.0, 1.0, 102.0]
    assert summarize(runs["a"]["decode_tok_s"], rate=True) == Spread(101.0, 100.0, 102.0, 3, 1)


def test_reruns_stop_at_the_limit():
    runs = run_interleaved(["a"], 3, lambda r, n: {"ms_per_sentence": [1.0, 1.0, 50.0, 1.0][r]}, extra_rounds=0)
    assert runs["a"]["ms_per_sentence"] == [1.0, 1.0, 50.0]
    assert summarize(runs["a"]["ms_per_sentence"], rate=False).kept == 2  # reported as 2 kept, 1 dropped
