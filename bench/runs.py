"""How the bench turns repeated speed runs into one figure: the order the runs go in, and which runs count.

* ``schedule``: round-robin over the variants, each round starting one variant later (round r runs variant
  (r + i) mod n i-th). Every variant runs once per round, so slow drift in the machine's background load (2 shared
  cores) reaches every variant alike, and no variant always runs first or last in its round.
* ``summarize``: the median of the runs that pass the outlier rule, with their min and max and how many were
  dropped. The rule works on time per unit of work (1 / tokens per second, or ms per sentence), where a stalled run
  is far out: a run is dropped when its time is more than ``K`` (3) robust standard deviations from the median
  time, the robust standard deviation being 1.4826 x the median absolute deviation (the factor that makes it the
  standard deviation of normal noise), floored at ``FLOOR`` (3%) of the median so that runs within 9% of the median
  are never dropped (with three runs two near-equal times would otherwise make the third an outlier at any distance).
  llama.cpp Q4_0's decode runs of 179.6, 222.0 and 0.4 tok/s (issue 15): times 5.57, 4.50 and 2244 ms, robust
  deviation 1.58 ms, so 0.4 is dropped and 222.0 kept.

This module imports nothing heavy.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Sequence

K = 3.0  # robust standard deviations
MAD_TO_SD = 1.4826  # MAD x this = the standard deviation, for normal noise
FLOOR = 0.03  # the robust standard deviation is at least this fraction of the median time

RULE = (f"runs whose time is more than {K:g} x max(1.4826 x MAD, {FLOOR:.0%} of the median) from the median time "
        "are dropped and rerun")


def schedule(names: Sequence[str], rounds: int) -> Iterator[tuple[int, str]]:
    """(round, name) in run order: round-robin, each round rotated one variant further."""
    n = len(names)
    for r in range(rounds):
        for i in range(n):
            yield r, names[(r + i) % n]


def outliers(times: Sequence[float]) -> list[bool]:
    """For each time, whether the rule drops it."""
    if len(times) < 3:  # two runs cannot say which one is off
        return [False] * len(times)
    med = statistics.median(times)
    mad = statistics.median(abs(t - med) for t in times)
    sd = max(MAD_TO_SD * mad, FLOOR * abs(med))
    return [abs(t - med) > K * sd for t in times]


@dataclass(frozen=True)
class Spread:
    """One speed figure over its runs: the median and the range of the kept runs, and how many were dropped."""

    median: float
    low: float
    high: float
    kept: int
    dropped: int

    def to_dict(self) -> dict:
        return asdict(self)


def dropped(values: Sequence[float], rate: bool) -> list[bool]:
    """``values``: one figure per run; ``rate`` when higher is faster (tokens/s, judged by 1/value), else a time."""
    return outliers([1.0 / v if rate and v > 0 else (float("inf") if rate else v) for v in values])


def summarize(values: Sequence[float], rate: bool) -> Spread:
    """The median and range of the runs ``dropped`` keeps."""
    if not values:
        raise ValueError("no runs to summarize")
    kept = [v for v, d in zip(values, dropped(values, rate)) if not d]
    return Spread(statistics.median(kept), min(kept), max(kept), len(kept), len(values) - len(kept))


def is_rate(key: str) -> bool:
    """Speed keys the bench records: ``*_tok_s`` are rates, ``ms_*`` times."""
    return key.endswith("_tok_s")


def spreads(runs: dict[str, list[float]]) -> dict[str, Spread]:
    """Each key's runs summarized (``is_rate`` decides how they are judged)."""
    return {k: summarize(v, is_rate(k)) for k, v in runs.items()}


def run_interleaved(names: Sequence[str], rounds: int, run_one: Callable[[int, str], dict[str, float]],
                    extra_rounds: int | None = None) -> dict[str, dict[str, list[float]]]:
    """``rounds`` rounds of ``schedule``, then up to ``extra_rounds`` (default ``rounds``) more over the variants
    that have fewer than ``rounds`` kept runs of some key, so a dropped run is replaced while the rule allows.
    ``run_one(round, name)`` -> {key: value}. Returns every run, dropped ones included, in run order."""
    runs: dict[str, dict[str, list[float]]] = {name: {} for name in names}

    def one(r: int, name: str) -> None:
        for k, v in run_one(r, name).items():
            runs[name].setdefault(k, []).append(v)

    for r, name in schedule(names, rounds):
        one(r, name)
    for extra in range(rounds if extra_rounds is None else extra_rounds):
        short = [n for n in names if any(s.kept < rounds for s in spreads(runs[n]).values())]
        if not short:
            break
        for i in range(len(short)):
            one(rounds + extra, short[(extra + i) % len(short)])
    return runs


def paired_ratios(times: dict[str, list[float]], reference: str) -> dict[str, Spread]:
    """Same-process rounds (``times[name][r]``: a variant's time in round r, every variant timed in every round):
    for each variant, ``reference``'s speed relative to it, round by round (its time / the reference's time in the
    same round: above 1, the reference is faster), summarized as median and range over the rounds. Pairing by
    round cancels what a round's machine state does to both; nothing is dropped."""
    ref = times[reference]
    out = {}
    for name, ts in times.items():
        if len(ts) != len(ref):
            raise ValueError(f"{name}: {len(ts)} rounds, {reference}: {len(ref)}")
        out[name] = undropped([t / rt for t, rt in zip(ts, ref)])
    return out


def undropped(values: Sequence[float]) -> Spread:
    """Median and range of every value (same-process rounds: no run is dropped)."""
    return Spread(statistics.median(values), min(values), max(values), len(values), 0)
