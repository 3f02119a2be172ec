"""remedy: after a package fails its accuracy gate, the closest single ``--set KEY=VALUE`` that passes, measured.

Encoders (``closest_fix``): the promotion search (edgeq/policy/encoder.py) aims at targets on calibration text
within the size budget; the gate measures held-back text, so a plan can meet every target and still fail, or the
budget can cut the search short. Then the counts after the packaged one are built as the export builds them (the
same plan, ORT conversion and held-back evaluation) until one passes, and the setting that makes the export package
exactly that count (a raised target, or a size limit that admits it) is named with what it measured and what it
costs in bytes. Exporting again with it rebuilds that very package: sensitivity and calibration do not depend on
these settings, and every step is deterministic. A package that fails on size alone passes with a
``package.max_size_ratio`` that admits its bytes.

Causal LMs (``first_passing``): the settings ``edgeq.policy.causal_lm.fix_candidates`` lists (GPTQ after RTN,
8-bit K/V, more 8-bit layers by the measured sensitivities, asymmetric blocks, a smaller block), cheapest in bytes
first and each within the size budget, are built as an export given it would build them until one passes, at most
``MAX_LM_TRIALS``. Each is one pass 2 and one held-back evaluation: pass 1 (the FP32 measurements, the reference
log-probabilities) is the failed export's, and the quantized linears it already made are reused.

Both look at the held-back text, as a user trying settings would; the searches that make a package never do, so
the gate's numbers stay a measurement on unseen text for every export that passes on the first try.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Protocol, Sequence, TypeVar

from edgeq.llm.evaluate import LMAccuracy
from edgeq.metrics import EncoderAccuracy
from edgeq.policy import promotion_count, selection_targets
from edgeq.policy.encoder import promotion_steps, within_size_budget
from edgeq.profiles import Profile
from edgeq.stages.quantize import Candidates
from edgeq.stages.record import over_size_ratio


class _Setting(Protocol):
    setting: str  # KEY=VALUE


Candidate = TypeVar("Candidate", bound=_Setting)


# Packages the causal-LM search builds at most. Each costs a pass 2 over the layers whose bits or settings changed
# (all of them for another method or block size) and the held-back evaluation: a 1B model's whole pass 2 took
# 1160 s and its evaluation 210 s of a 2276 s export (bench/results/scale.json).
MAX_LM_TRIALS = 4


@dataclass(frozen=True)
class Measured:
    """One candidate package as the gate measures it."""

    promoted: int  # layers promoted: to the sensitive precision (encoders), to 8 bits (causal LMs)
    accuracy: EncoderAccuracy | LMAccuracy  # on the held-back text
    size: dict  # a manifest size section (encoders: edgeq/stages/record.py size_report)
    accuracy_failures: tuple[str, ...]
    over_size: bool

    @property
    def passes(self) -> bool:
        return not self.accuracy_failures and not self.over_size


@dataclass(frozen=True)
class Fix:
    """Settings and the package an export given them builds, as measured (a fix when ``measured.passes``)."""

    settings: tuple[str, ...]  # KEY=VALUE, each as --set takes it
    measured: Measured


@dataclass(frozen=True)
class Search:
    """What a bounded search built, in order, the first that passes (None: none did), and what it did not reach."""

    tried: tuple[Fix, ...]
    untried: tuple[str, ...]  # KEY=VALUE

    @property
    def fix(self) -> Fix | None:
        return next((t for t in self.tried if t.measured.passes), None)


def first_passing(candidates: Sequence[Candidate], measure: Callable[[Candidate], Measured],
                  limit: int = MAX_LM_TRIALS) -> Search:
    """``candidates`` (each with a ``setting``) measured in order until one passes, at most ``limit`` of them."""
    tried: list[Fix] = []
    for c in candidates[:limit]:
        tried.append(Fix((c.setting,), measure(c)))
        if tried[-1].measured.passes:
            break
    return Search(tuple(tried), tuple(c.setting for c in candidates[len(tried):]))


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
