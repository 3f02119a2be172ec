"""The encoder-on-CPU policy: one ordered function that decides every node's precision and says why.

Order (first rule that applies wins), as llama.cpp's ``llama_tensor_get_type``:
  1. hard rules from the op category (embeddings and norms FP16, the mask path FP32, ...);
  2. the profile's overrides (``keep_fp32_nodes``);
  3. measured sensitivity: the ``promote`` most sensitive linear layers get ``sensitive_precision``;
  4. the default: linear layers get static INT8 (int8 weights and activations).
Nothing depends on visiting order: the sensitivity ranking is passed in, sorted. How many to promote is chosen by
``promotion_count``: candidate plans are measured on calibration text in ``promotion_steps`` order, and the first
that meets every target (``selection_targets``: one per gated metric, each at least its accuracy-budget bar) is
kept, unless its package is over the size budget (``within_size_budget``: then the most promoted count that fits);
the steps, what each left unmet and why the count was cut go into the manifest.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

from edgeq.categories import NodeInfo
from edgeq.metrics import EncoderAccuracy, shown
from edgeq.policy.plan import NodeDecision, PrecisionPlan, Sensitivity
from edgeq.precision import ENCODER_CPU, check_implemented
from edgeq.profiles import Profile

# Candidate promotion counts; each costs one full evaluation on calibration text.
PROMOTION_STEPS = (0, 1, 2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)

# Why each category that is not quantized stays where it is. The numbers are MiniLM measurements from issue 2.
HARD_RULES = {
    "embedding": ("fp16", "embedding table: a row lookup with no arithmetic to speed up; FP16 halves its bytes and "
                          "keeps ~3 significant digits, int8 rows would need a per-row scale"),
    "norm": ("fp16", "normalization: tiny parameters and a mean/variance that needs float range; computed in FP16 "
                     "on ONNX Runtime's CPU LayerNormalization kernel"),
    "attention_mask": ("fp32", "attention-mask path: carries float32-minimum constants; any quantized tensor here "
                               "loses its whole range (quantizing it took MiniLM's mean cosine to 0.30)"),
    "softmax": ("fp32", "softmax over masked scores: its input holds the float32-minimum mask bias"),
    "attention": ("fp32", "fused attention (ONNX Runtime's GroupQueryAttention kernel, rotary inside): float "
                          "activations and KV cache; it has no constant weight"),
    "attention_matmul": ("fp32", "activation x activation MatMul: no constant weight to store smaller; static "
                                 "ranges of both inputs cost accuracy for little speed on CPU"),
    "other": ("fp32", "elementwise/shape op: no quantized CPU kernel that saves time or bytes"),
}


def decide_precision(
    nodes: dict[str, NodeInfo],
    profile: Profile,
    sensitivity: Sensitivity | None = None,
    promote: int = 0,
) -> PrecisionPlan:
    q = profile.quantization
    ranking = sensitivity.ranking() if sensitivity else []
    rank = {name: i for i, name in enumerate(ranking)}
    promoted = set(ranking[:promote])
    decisions = []
    for info in nodes.values():
        gain = sensitivity.gains.get(info.name) if sensitivity else None
        precision, reason = _decide(info, q, rank, promoted, gain, len(ranking))
        checked = check_implemented(precision, ENCODER_CPU, info.category, info.name)
        decisions.append(NodeDecision(info.name, info.op_type, info.category, info.role, checked, reason, gain))
    return PrecisionPlan(tuple(decisions))


def _decide(info: NodeInfo, q, rank: dict[str, int], promoted: set[str], gain: float | None, n: int) -> tuple[str, str]:
    # 1. Hard rules from the category.
    if info.category == "embedding" and info.shared_weight:
        return "fp32", "embedding table also read by another node (tied weights): one copy is kept, at FP32"
    if info.category == "embedding" and "embedding" not in q.keep_fp16:
        return "fp32", "embedding table: profile does not list 'embedding' in keep_fp16"
    if info.category == "norm" and "norm" not in q.keep_fp16:
        return "fp32", "normalization: profile does not list 'norm' in keep_fp16"
    if info.category in HARD_RULES:
        return HARD_RULES[info.category]
    # Only linear layers remain.
    # 2. Profile overrides.
    for pattern in q.keep_fp32_nodes:
        if fnmatch.fnmatchcase(info.name, pattern):
            return "fp32", f"profile override: keep_fp32_nodes matches '{pattern}'"
    # 3. Measured sensitivity.
    if info.name in promoted:
        return q.sensitive_precision, (
            f"sensitive: rank {rank[info.name] + 1} of {n}; {q.sensitive_precision} cuts its output error by "
            f"{gain:.2e} (relative, squared, on calibration tokens) against static int8, so it gets it"
        )
    # 4. Default.
    if gain is not None:
        return "int8", (f"linear layer: static int8 (rank {rank[info.name] + 1} of {n}; promotion would cut its "
                        f"output error by {gain:.2e})")
    return "int8", "linear layer: static int8 weights and activations"


def promotion_steps(n: int) -> list[int]:
    """The promotion counts tried, in order, for ``n`` linear layers (always ending with all of them)."""
    return sorted(k for k in {*PROMOTION_STEPS, n} if k <= n)


@dataclass(frozen=True)
class SelectionTarget:
    """One gated metric: the bar the promotion search holds calibration text to (the profile's target, never below
    the budget's bar) and the budget's bar, which the held-back text is gated on."""

    label: str   # as messages print it
    metric: str  # the EncoderAccuracy field
    key: str     # the profile key of the target: --set KEY=VALUE
    target: float
    gate: float


def selection_targets(profile: Profile) -> tuple[SelectionTarget, ...]:
    """Every metric the accuracy gate checks, in the order messages list them. Mean cosine alone is not enough: it
    does not imply the worst text's cosine, nor that nearest neighbours stay the same (issue 17: a MiniLM fine-tune
    met the mean-cosine target on calibration text and failed retrieval top-1 held back, 0.9469 < 0.95)."""
    q, b = profile.quantization, profile.accuracy
    rows = (("mean cosine", "mean_cosine", q.sensitivity_target_mean_cosine, b.min_mean_cosine),
            ("min cosine", "min_cosine", q.sensitivity_target_min_cosine, b.min_min_cosine),
            ("retrieval top-1", "retrieval_top1", q.sensitivity_target_retrieval_top1, b.min_retrieval_top1))
    return tuple(SelectionTarget(label, metric, f"quantization.sensitivity_target_{metric}", max(target, gate), gate)
                 for label, metric, target, gate in rows)


def unmet_targets(acc: EncoderAccuracy, profile: Profile) -> tuple[str, ...]:
    """What ``acc`` (on calibration text) leaves unmet, one phrase per target; NaN is unmet."""
    return tuple(f"{t.label} {shown(getattr(acc, t.metric), t.target)} < {t.target}" for t in selection_targets(profile)
                 if not getattr(acc, t.metric) >= t.target)


def selection_met(acc: EncoderAccuracy, profile: Profile) -> bool:
    """Every gated metric meets its target on calibration text."""
    return not unmet_targets(acc, profile)


@dataclass(frozen=True)
class SelectionStep:
    """One candidate promotion count as the search measured it on calibration text."""

    promoted: int
    accuracy: EncoderAccuracy
    unmet: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"promoted": self.promoted, **self.accuracy.to_dict(), "unmet": list(self.unmet)}


def promotion_count(n: int, score: Callable[[int], EncoderAccuracy], profile: Profile) -> tuple[SelectionStep, ...]:
    """The steps of the search over ``n`` linear layers: ``score(k)`` is the calibration-text accuracy with the
    ``k`` most sensitive promoted. It stops at the first count that meets every target; the last step is the one
    chosen (all ``n`` when none meets them: the most accurate plan there is, for the gate to judge)."""
    steps = []
    for k in promotion_steps(n):
        acc = score(k)
        steps.append(SelectionStep(k, acc, unmet_targets(acc, profile)))
        if not steps[-1].unmet:
            break
    return tuple(steps)


def within_size_budget(wanted: int, n: int, fits: Callable[[int], bool]) -> tuple[int, str]:
    """The count to package, and why when it is not ``wanted`` (what the targets asked for). Every promotion costs
    bytes (an int8 weight-only layer stores a float scale per 32 weights: +12.5% of its weights), so the search
    never goes past the size budget: when ``wanted``'s package does not fit (``fits(k)``: measured, the package
    with ``k`` promoted is within the budget), the most promoted count below it that fits is packaged, for the gate
    to judge; ``wanted`` itself when none does, for the size check to report."""
    if fits(wanted):
        return wanted, ""
    for k in reversed([s for s in promotion_steps(n) if s < wanted]):
        if fits(k):
            return k, (f"the targets need {wanted} layers promoted, over the size budget: {k} is the most "
                       "promoted count that fits")
    return wanted, "no promotion count fits the size budget"
