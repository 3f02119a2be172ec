"""remedy: after an encoder package fails its gate, the closest single ``--set KEY=VALUE`` that passes, measured.

The promotion search (edgeq/policy/encoder.py) aims at targets on calibration text; the gate measures held-back
text, so a plan can meet every target and still fail. Then the counts after the chosen one are built as the export
builds them (the same plan, ORT conversion and held-back evaluation) until one passes, and the setting that makes
the search stop exactly there is named with what it measured and what it costs in bytes. Re-running the export with
it rebuilds that very package: sensitivity and calibration do not depend on the targets, and every step is
deterministic. A package that fails on size alone passes with a ``package.max_size_ratio`` that admits its bytes.

This looks at the held-back text, as a user trying settings would; the search itself never does, so the gate's
numbers stay a measurement on unseen text for every export that passes on the first try.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from edgeq.metrics import EncoderAccuracy
from edgeq.policy import promotion_count, selection_targets
from edgeq.policy.encoder import promotion_steps, with_target
from edgeq.profiles import Profile
from edgeq.stages.quantize import Candidates


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


def target_setting(candidates: Candidates, k: int, profile: Profile) -> str | None:
    """A raised selection target with which the search stops at exactly ``k`` promoted layers, or None.

    Each target is tried in the order the gate lists them (mean cosine first: it grows almost monotonically with
    promotion, retrieval top-1 does not), at the fewest decimals of its value at ``k`` that land there."""
    for target in selection_targets(profile):
        got = getattr(candidates.score(k), target.metric)
        for digits in range(3, 9):
            value = floored(got, digits)
            if value <= target.target:
                continue
            steps = promotion_count(candidates.n, candidates.score, with_target(profile, target, value))
            if steps[-1].promoted == k and not steps[-1].unmet:
                return f"{target.key}={value:.{digits}f}"
    return None


def closest_fix(candidates: Candidates, base: Measured, measure: Callable[[int], Measured],
                profile: Profile) -> Fix | None:
    """The fix for ``base`` (the package built, which failed): the size limit its bytes need when only the size
    failed; else the first promotion count after it whose package passes the accuracy gate, with the target that
    makes the search stop there (and, when that package is over the size budget, the limit it needs too). None when
    no count passes."""
    if not base.accuracy_failures:
        return Fix((size_limit_setting(base.size),), base)
    for k in promotion_steps(candidates.n):
        if k <= base.promoted:
            continue
        m = measure(k)
        if m.accuracy_failures:
            continue
        setting = target_setting(candidates, k, profile)
        if setting is None:  # no single target stops the search here; a later count may be reachable
            continue
        return Fix((setting, *([size_limit_setting(m.size)] if m.over_size else [])), m)
    return None
