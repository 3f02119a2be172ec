"""remedy: after an encoder package fails its gate, the closest single ``--set KEY=VALUE`` that passes, measured.

The promotion search (edgeq/policy/encoder.py) aims at targets on calibration text within the size budget; the
gate measures held-back text, so a plan can meet every target and still fail, or the budget can cut the search
short. Then the counts after the packaged one are built as the export builds them (the same plan, ORT conversion
and held-back evaluation) until one passes, and the setting that makes the export package exactly that count (a
raised target, or a size limit that admits it) is named with what it measured and what it costs in bytes. Exporting
again with it rebuilds that very package: sensitivity and calibration do not depend on these settings, and every
step is deterministic. A package that fails on size alone passes with a ``package.max_size_ratio`` that admits its
bytes.

This looks at the held-back text, as a user trying settings would; the search itself never does, so the gate's
numbers stay a measurement on unseen text for every export that passes on the first try.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

from edgeq.metrics import EncoderAccuracy
from edgeq.policy import promotion_count, selection_targets
from edgeq.policy.encoder import promotion_steps, within_size_budget
from edgeq.profiles import Profile
from edgeq.stages.quantize import Candidates
from edgeq.stages.record import over_size_ratio


@dataclass(frozen=True)
class Measured:
    """One candidate package as the gate measures it."""

    promoted: int
    accuracy: EncoderAccuracy  # on the held-back text
    size: dict  # a manifest size section (edgeq/stages/record.py size_report)
    accuracy_failures: tuple[str, ...]
    over_size: bool

    @property
    def passes(self) -> bool:
        return not self.accuracy_failures and not self.over_size


@dataclass(frozen=True)
class Fix:
    settings: tuple[str, ...]  # KEY=VALUE, each as --set takes it
    measured: Measured


def size_limit_setting(size: dict) -> str:
    """The smallest ``package.max_size_ratio`` (4 decimals, rounded up) that admits ``size['model_bytes']``."""
    need = math.ceil(size["model_bytes"] / size["fp32_onnx_bytes"] * 1e4) / 1e4
    while need * size["fp32_onnx_bytes"] < size["model_bytes"]:  # float rounding of the product
        need += 1e-4
    return f"package.max_size_ratio={need:.4f}"


def floored(value: float, digits: int) -> float:
    return math.floor(value * 10**digits) / 10**digits


def with_setting(profile: Profile, key: str, value: float) -> Profile:
    """``profile`` with ``SECTION.FIELD`` set, as ``--set`` sets it (values here are ones edgeq made: in range)."""
    section, name = key.split(".")
    return replace(profile, **{section: replace(getattr(profile, section), **{name: value})})


def landing(candidates: Candidates, size_of: Callable[[int], dict], profile: Profile) -> int:
    """The count an export with ``profile`` packages: the targets' count cut to the size budget, as the recipe does
    (``size_of(k)``: the measured size section of the package with ``k`` promoted)."""
    wanted = promotion_count(candidates.n, candidates.score, profile)[-1].promoted
    ratio = profile.package.max_size_ratio
    return within_size_budget(wanted, candidates.n,
                              lambda k: not over_size_ratio({**size_of(k), "max_ratio": ratio}))[0]


def settings_for(candidates: Candidates, k: int, size_of: Callable[[int], dict],
                 profile: Profile) -> tuple[str, ...] | None:
    """The fewest settings with which the export packages exactly ``k`` promoted layers, or None: the size limit
    alone (when the budget cut the search short of ``k``), else a raised target (each in the order the gate lists
    them, mean cosine first: it grows almost monotonically with promotion, retrieval top-1 does not; at the fewest
    decimals of its value at ``k`` that land there), with the size limit too when ``k`` is over the budget."""
    size = size_of(k)
    limit = [] if not over_size_ratio(size) else [size_limit_setting(size)]
    options = [tuple(limit)] if limit else []
    for target in selection_targets(profile):
        got = getattr(candidates.score(k), target.metric)
        options += [(f"{target.key}={floored(got, d):.{d}f}", *limit) for d in range(3, 9)
                    if floored(got, d) > target.target]
    for settings in dict.fromkeys(options):  # in order, each once
        p = profile
        for setting in settings:
            key, value = setting.split("=")
            p = with_setting(p, key, float(value))
        if landing(candidates, size_of, p) == k:
            return settings
    return None


def closest_fix(candidates: Candidates, base: Measured, measure: Callable[[int], Measured],
                size_of: Callable[[int], dict], profile: Profile) -> Fix | None:
    """The fix for ``base`` (the package built, which failed): the size limit its bytes need when only the size
    failed; else the first promotion count after it whose package passes the accuracy gate, with the settings that
    make the export package exactly that count. None when no count passes."""
    if not base.accuracy_failures:
        return Fix((size_limit_setting(base.size),), base)
    for k in promotion_steps(candidates.n):
        if k <= base.promoted:
            continue
        m = measure(k)
        if m.accuracy_failures:
            continue
        settings = settings_for(candidates, k, size_of, profile)
        if settings is None:  # nothing stops the search here; a later count may be reachable
            continue
        return Fix(settings, m)
    return None
