"""The encoder-on-QNN-HTP policy: 16-bit activations everywhere, 8-bit per-tensor weights, and 16-bit weights for
the ``promote`` linear layers with the lowest 8-bit weight SQNR (measured by edgeq.qnn.quantize.weight_sqnr).

QNN has no per-channel MatMul, so a weight with outliers loses most of its resolution at 8 bits (on MiniLM the six
FFN-down projections are 8-26 dB, most others above 33 dB). How many to promote is chosen by measuring candidate
plans on calibration text; MiniLM's numbers: see docs/decisions/qnn-htp.md.
"""

from __future__ import annotations

import onnx

from edgeq.categories import classify
from edgeq.policy.plan import NodeDecision, PrecisionPlan
from edgeq.precision import ENCODER_QNN, check_implemented
from edgeq.profiles import QNNSpec

PROMOTION_STEPS = (0, 2, 4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)


def sqnr_ranking(sqnr: dict[str, tuple[str, float]]) -> list[str]:
    """Linear nodes, lowest 8-bit weight SQNR first (ties by name)."""
    return sorted(sqnr, key=lambda n: (sqnr[n][1], n))


def promotion_steps(n: int, spec: QNNSpec) -> list[int]:
    """The promotion counts tried, in order; only 0 when the sensitive width is no wider than the default."""
    return sorted({s for s in PROMOTION_STEPS if s <= n} | {n}) if spec.sensitive_weight_bits > spec.weight_bits else [0]


def decide_qnn_precision(model: onnx.ModelProto, sqnr: dict[str, tuple[str, float]], promote: int,
                         spec: QNNSpec, mask_bias_changed: bool) -> PrecisionPlan:
    """Every node's precision and why, in one order: the mask path, linear layers (the ``promote`` lowest-SQNR
    ones at ``sensitive_weight_bits``, then the default), the rest."""
    ranking = sqnr_ranking(sqnr)
    promoted = set(ranking[:promote])
    a = f"a{spec.activation_bits}"
    decisions = []
    for info in classify(model).values():
        if info.category == "attention_mask":
            precision = a
            reason = (f"attention-mask path: {'float32-minimum bias replaced by ' + str(spec.mask_bias) + ', then ' if mask_bias_changed else ''}"
                      f"{spec.activation_bits}-bit QDQ like every activation (HTP runs no float ops)")
        elif info.category == "norm":
            precision = a
            reason = (f"normalization: {spec.activation_bits}-bit activations, {spec.weight_bits}-bit per-tensor scale; "
                      f"HTP computes LayerNorm in fixed point")
        elif info.category == "linear":
            db, rank = sqnr[info.name][1], ranking.index(info.name) + 1
            if info.name in promoted:
                precision = f"w{spec.sensitive_weight_bits}{a}"
                reason = (f"sensitive: {spec.weight_bits}-bit per-tensor weight SQNR {db:.1f} dB, rank {rank} of "
                          f"{len(ranking)} lowest; {spec.sensitive_weight_bits}-bit symmetric weights")
            else:
                precision = f"w{spec.weight_bits}{a}"
                reason = (f"linear layer: {spec.weight_bits}-bit per-tensor weights (SQNR {db:.1f} dB, rank {rank} of "
                          f"{len(ranking)}), {spec.activation_bits}-bit activations")
        elif info.category == "embedding":
            precision = f"w{spec.activation_bits}"
            reason = (f"embedding table: {spec.activation_bits}-bit per tensor (ONNX Runtime's QNN config quantizes a "
                      f"Gather table at the activation width); HTP's Gather reads it quantized")
        else:
            precision = a
            reason = f"{info.category} op: {spec.activation_bits}-bit QDQ activations, fixed point on HTP"
        checked = check_implemented(precision, ENCODER_QNN, info.category, info.name)
        decisions.append(NodeDecision(info.name, info.op_type, info.category, info.role, checked, reason,
                                      sqnr[info.name][1] if info.name in sqnr else None))
    return PrecisionPlan(tuple(decisions))


def promoted_weights(plan: PrecisionPlan, sqnr: dict[str, tuple[str, float]], spec: QNNSpec) -> list[str]:
    """The weights of the linear layers the plan gives ``sensitive_weight_bits`` (what write_qdq overrides), lowest
    SQNR first."""
    if spec.sensitive_weight_bits <= spec.weight_bits:
        return []
    wide = f"w{spec.sensitive_weight_bits}a{spec.activation_bits}"
    by_name = plan.by_name()
    return [sqnr[n][0] for n in sqnr_ranking(sqnr) if by_name[n].precision == wide]
