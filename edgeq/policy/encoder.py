"""The encoder-on-CPU policy: one ordered function that decides every node's precision and says why.

Order (first rule that applies wins), as llama.cpp's ``llama_tensor_get_type``:
  1. hard rules from the op category (embeddings and norms FP16, the mask path FP32, ...);
  2. the profile's overrides (``keep_fp32_nodes``);
  3. measured sensitivity: the ``promote`` most sensitive linear layers get ``sensitive_precision``;
  4. the default: linear layers get static INT8 (int8 weights and activations).
Nothing depends on visiting order: the sensitivity ranking is passed in, sorted. How many to promote is chosen by
measuring candidate plans on calibration text (``promotion_steps``, stopping at the first that ``selection_met``).
"""

from __future__ import annotations

import fnmatch

from edgeq.categories import NodeInfo
from edgeq.metrics import EncoderAccuracy
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
        drop = sensitivity.drops.get(info.name) if sensitivity else None
        precision, reason = _decide(info, q, rank, promoted, drop, len(ranking))
        checked = check_implemented(precision, ENCODER_CPU, info.category, info.name)
        decisions.append(NodeDecision(info.name, info.op_type, info.category, info.role, checked, reason, drop))
    return PrecisionPlan(tuple(decisions))


def _decide(info: NodeInfo, q, rank: dict[str, int], promoted: set[str], drop: float | None, n: int) -> tuple[str, str]:
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
            f"sensitive: rank {rank[info.name] + 1} of {n}; alone at int8 it costs {drop:.5f} mean cosine on "
            f"calibration text, so it gets {q.sensitive_precision}"
        )
    # 4. Default.
    if drop is not None:
        return "int8", f"linear layer: static int8 (rank {rank[info.name] + 1} of {n}, alone costs {drop:.5f} mean cosine)"
    return "int8", "linear layer: static int8 weights and activations"


def promotion_steps(n: int) -> list[int]:
    """The promotion counts tried, in order, for ``n`` linear layers (always ending with all of them)."""
    return sorted(k for k in {*PROMOTION_STEPS, n} if k <= n)


def selection_met(acc: EncoderAccuracy, profile: Profile) -> bool:
    """The bar on calibration text: the profile's target mean cosine (above the budget, for a margin on unseen
    text) and the budget's min-cosine and retrieval floors, which mean cosine alone does not imply."""
    b = profile.accuracy
    return (acc.mean_cosine >= profile.quantization.sensitivity_target_mean_cosine
            and acc.min_cosine >= b.min_min_cosine and acc.retrieval_top1 >= b.min_retrieval_top1)
