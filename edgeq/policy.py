"""The precision policy: one ordered function that decides every node's precision and says why.

Order (first rule that applies wins), as llama.cpp's ``llama_tensor_get_type``:
  1. hard rules from the op category (embeddings and norms FP16, the mask path FP32, ...);
  2. the profile's overrides (``keep_fp32_nodes``);
  3. measured sensitivity: the ``promote`` most sensitive linear layers get ``sensitive_precision``;
  4. the default: linear layers get static INT8 (int8 weights and activations).
Nothing depends on visiting order: the sensitivity ranking is passed in, sorted.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass

from edgeq.categories import NodeInfo
from edgeq.profiles import Profile


@dataclass(frozen=True)
class NodeDecision:
    name: str
    op_type: str
    category: str
    role: str
    precision: str  # int8 | int8-weight-only | w8a16 | fp16 | fp32
    reason: str
    sensitivity: float | None = None  # mean-cosine drop when this layer alone is int8


@dataclass(frozen=True)
class PrecisionPlan:
    decisions: tuple[NodeDecision, ...]

    def by_name(self) -> dict[str, NodeDecision]:
        return {d.name: d for d in self.decisions}

    def of(self, precision: str) -> list[NodeDecision]:
        return [d for d in self.decisions if d.precision == precision]

    def summary(self) -> dict[str, dict[str, int]]:
        """category -> precision -> node count."""
        out: dict[str, Counter] = {}
        for d in self.decisions:
            out.setdefault(d.category, Counter())[d.precision] += 1
        return {c: dict(v) for c, v in sorted(out.items())}


@dataclass(frozen=True)
class Sensitivity:
    """Per-layer mean-cosine drop against FP32 when only that layer is quantized to static INT8."""

    drops: dict[str, float]
    samples: int

    def ranking(self) -> list[str]:
        return sorted(self.drops, key=lambda n: (-self.drops[n], n))


# Why each category that is not quantized stays where it is. The numbers are MiniLM measurements from issue 2.
_HARD_RULES = {
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
        decisions.append(NodeDecision(info.name, info.op_type, info.category, info.role, precision, reason, drop))
    return PrecisionPlan(tuple(decisions))


def _decide(info: NodeInfo, q, rank: dict[str, int], promoted: set[str], drop: float | None, n: int) -> tuple[str, str]:
    # 1. Hard rules from the category.
    if info.category == "embedding" and info.shared_weight:
        return "fp32", "embedding table also read by another node (tied weights): one copy is kept, at FP32"
    if info.category == "embedding" and "embedding" not in q.keep_fp16:
        return "fp32", "embedding table: profile does not list 'embedding' in keep_fp16"
    if info.category == "norm" and "norm" not in q.keep_fp16:
        return "fp32", "normalization: profile does not list 'norm' in keep_fp16"
    if info.category in _HARD_RULES:
        return _HARD_RULES[info.category]
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


def decide_llm_precision(fused, quantized, int4_decisions, profile: Profile) -> PrecisionPlan:
    """Every node of a causal LM, in the same order of rules: hard rules by category, then the INT4 pass's own
    per-layer decisions (which record why a linear layer was kept, e.g. a tied head), then the default.

    ``fused`` is the graph before INT4 (categories come from it), ``quantized`` the graph after; the INT4 pass renames
    a quantized MatMul ``<name>_Q<bits>`` (4, or 8 for the layers it promotes), so decisions are keyed by the quantized
    graph's names and carry the pass's own reason (why 4, why 8).
    """
    from edgeq.categories import classify, embedding_tables

    spec = profile.llm
    int4 = {d.node: d for d in int4_decisions}
    after = {n.name for n in quantized.graph.node}
    infos = classify(fused)
    tables = embedding_tables(fused, infos)
    tied_t = {n.name: n.output[0] for n in fused.graph.node if n.op_type == "Transpose" and n.input[0] in tables}
    tied_mm = {n.name for n in fused.graph.node if n.op_type == "MatMul" and n.input[1] in tied_t.values()}
    fp16_head = spec.lm_head_precision == "fp16" and spec.embedding_precision == "fp16"
    decisions = []
    for info in infos.values():
        name, op, precision, reason = info.name, info.op_type, "fp32", ""
        if info.name in tied_t or info.name in tied_mm:
            if fp16_head:
                precision = "fp16"
                reason = ("tied lm_head: reads the FP16 embedding table through this transpose, so one FP16 copy "
                          "serves lookup and head (smallest file; profile llm.lm_head_precision = 'fp16')")
            else:
                reason = "tied lm_head left on the shared table at FP32"
        elif info.category == "embedding":
            if info.shared_weight and not fp16_head:
                reason = "embedding table also read by the lm_head (tied weights): one FP32 copy"
            elif spec.embedding_precision == "fp16":
                precision, reason = "fp16", _HARD_RULES["embedding"][1]
            else:
                reason = "embedding table: profile sets llm.embedding_precision = 'fp32'"
        elif info.name in int4:
            d = int4[info.name]
            if d.quantize and f"{name}_Q{d.bits}" in after:
                name, op, precision = f"{name}_Q{d.bits}", "MatMulNBits", f"int{d.bits}"
                reason = f"linear layer, MatMulNBits: {d.reason}"
            else:
                reason = d.reason
        elif info.category == "norm":
            reason = ("fused RMSNorm (SimplifiedLayerNormalization): FP32 compute; its scale is 1-D and tiny, and "
                      "the fused residual output feeds the next layer")
        else:
            precision, reason = _HARD_RULES.get(info.category, ("fp32", "kept FP32"))
            if precision == "fp16":
                precision = "fp32"
        decisions.append(NodeDecision(name, op, info.category, info.role, precision, reason))
    return PrecisionPlan(tuple(decisions))
