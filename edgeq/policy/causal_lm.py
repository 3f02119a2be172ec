"""The causal-LM policy: which linear layers get INT4, which 8 bits (K/V projections, the layers INT4 hurts most,
a separate head) within the size budget, and every node's precision, decided from measurements before any pass.

``edgeq.decoder.layerwise.measure`` measures one layer at a time (shapes, K/V projections, INT4 relative output
error per layer, stored bytes); ``decide_int4`` chooses bits from those numbers within ``max_linear_bits`` (and an
optional ``max_model_bytes``); ``quantized_layers`` carries the plan out and ``decide_decoder_precision`` records
every node. Why 8 bits for K/V and for layers above ``PROMOTE`` x the median error: docs/decisions/int4.md.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, replace
from typing import Collection, Mapping

import numpy as np
import onnx

from edgeq.categories import classify, embedding_tables
from edgeq.policy.encoder import HARD_RULES
from edgeq.policy.plan import NodeDecision, PrecisionPlan
from edgeq.precision import CAUSAL_LM, LM_HEAD, Precision, check_implemented
from edgeq.profiles import LLMSpec, Profile, parse_setting

BITS = 4
HEAD_NAME = "lm_head"  # the head's linear name in a decoder written by edgeq.decoder
PROMOTED_BITS = 8  # MatMulNBits' other CPU width, for the layers INT4 hurts most
PROMOTE = 2.0  # promote a layer whose INT4 relative output error is above 2x the median (SmolLM2: v_proj, layer 0 up)
FLOAT_WEIGHTS = ("FLOAT", "FLOAT16")  # what MatMulNBits' scales can be


def matmulnbits_bytes(k: int, n: int, bits: int, block_size: int, symmetric: bool, scale_bytes: int = 4) -> int:
    """Bytes MatMulNBits stores for a [K, N] weight: codes, one scale per block, packed zero points if asymmetric."""
    blocks = math.ceil(k / block_size)
    codes = n * blocks * block_size * bits // 8
    zps = 0 if symmetric else n * (math.ceil(blocks / 2) if bits == 4 else blocks)
    return codes + n * blocks * scale_bytes + zps


def int4_setting(method: str, clip: bool, refit: bool, with_stats: bool, block_size: int, symmetric: bool,
                 accuracy_level: int) -> str:
    """How the INT4 layers are quantized, as reasons and the manifest name it."""
    return (f"{method}{'+clip' if clip else ''}{'+refit' if refit and with_stats else ''}, block {block_size}, "
            f"{'symmetric' if symmetric else 'asymmetric'}, accuracy_level {accuracy_level}")


@dataclass(frozen=True)
class LinearFacts:
    """What was measured about one linear layer (a MatMul with a constant weight) before any decision."""

    node: str  # the linear's name (edgeq.decoder.layerwise.linear_name)
    weight: str  # the tensor it reads (the embedding table itself for a tied head, through ``transpose``)
    transpose: str | None  # how a tied head reads the table, else None
    k: int
    n: int
    tied_to: str | None  # the embedding table a tied head shares, else None
    weight_type: str  # TensorProto type name
    kv_cache: str | None  # the present.* output this projection writes, if any
    sensitivity: float | None  # INT4 RTN relative output error tr(E^T H E) / tr(W^T H W); None without statistics


@dataclass(frozen=True)
class Int4Facts:
    layers: tuple[LinearFacts, ...]  # graph order
    initializer_bytes: dict[str, tuple[int, int]]  # every initializer -> (values, bytes per value as stored)


@dataclass(frozen=True)
class Int4Decision:
    """``bits`` 4 or 8 for a quantized layer, 0 for one kept in its float type."""

    node: str
    bits: int
    reason: str
    k: int
    n: int
    sensitivity: float | None = None  # INT4 RTN relative output error, when promotion by it was asked for
    table: bool = False  # an 8-bit embedding table's codes (a tied head reads them): outside the linear average

    @property
    def quantize(self) -> bool:
        return self.bits > 0


@dataclass(frozen=True)
class Int4Rules:
    """The choices ``decide_int4`` applies (``int4_rules`` derives them from a profile)."""

    setting: str  # int4_setting(...), named in the reasons
    block_size: int = 32
    symmetric: bool = False
    quantize_tied: bool = False  # quantize a head tied to the embedding table (stores a second copy)
    tied_bits: int = BITS
    int8_nodes: frozenset[str] | None = None  # the 8-bit layers outright (no K/V or sensitivity rule then)
    int8_kv: bool = True
    promote: float | None = PROMOTE  # None: no promotion by sensitivity
    max_model_bytes: int | None = None
    max_linear_bits: float | None = None  # average stored bits per weight over the quantized layers
    fp16_initializers: frozenset[str] = frozenset()  # stored at 2 bytes per value (the FP16 embedding table)
    int8_tables: frozenset[str] = frozenset()  # embedding tables stored at 8 bits (a tied head shares the codes)


def int4_rules(spec: LLMSpec, tables: frozenset[str] = frozenset(), with_stats: bool = True) -> Int4Rules:
    """The profile's INT4 choices: a separate head unless it shares the FP16 table, K/V at 8 bits, promotion.
    ``tables``: the embedding tables by name (as edgeq.decoder.layerwise names them; stored at FP16 by default)."""
    refit = spec.int4_method == "rtn"  # refit after RTN only (docs/decisions/int4.md has the numbers)
    return Int4Rules(
        setting=int4_setting(spec.int4_method, True, refit, with_stats, spec.block_size, spec.symmetric,
                             spec.accuracy_level),
        block_size=spec.block_size, symmetric=spec.symmetric, quantize_tied=spec.lm_head_precision != "fp16",
        tied_bits=PROMOTED_BITS if spec.lm_head_precision == "int8" else BITS, int8_kv=spec.int8_kv,
        promote=spec.promote or None, max_model_bytes=int(spec.max_size_mb * 1e6) if spec.max_size_mb else None,
        max_linear_bits=spec.max_bits_per_weight,
        fp16_initializers=tables if spec.embedding_precision == "fp16" else frozenset(),
        int8_tables=tables if spec.embedding_precision == "int8" else frozenset())


def decide_int4(facts: Int4Facts, rules: Int4Rules) -> tuple[Int4Decision, ...]:
    """Bits per linear layer, in order: kept (not float, tied) -> 8 bits wanted (the named layers; or a
    separate head, K/V projections, then sensitivity above ``promote`` x the median, highest first) -> taken in that
    order while the model stays within ``max_model_bytes`` -> INT4."""
    keep = {layer.node: why for layer in facts.layers if (why := _kept(layer, rules))}
    todo = [layer for layer in facts.layers if layer.node not in keep]
    sens = {} if rules.promote is None or rules.int8_nodes is not None else \
        {layer.node: layer.sensitivity for layer in todo if layer.sensitivity is not None}
    median = float(np.median(list(sens.values()))) if sens else 0.0
    if rules.int8_nodes is not None:
        wanted = {layer.node: "INT8: named in int8_nodes" for layer in todo if layer.node in rules.int8_nodes}
    else:
        wanted = {layer.node: f"INT8: a K/V projection (writes the KV cache '{layer.kv_cache}')"
                  for layer in todo if layer.kv_cache and rules.int8_kv}
        if rules.promote is not None:
            for node, s in sorted(sens.items(), key=lambda kv_: -kv_[1]):
                if node not in wanted and s > rules.promote * median:
                    wanted[node] = (f"INT8: INT4 relative output error {s:.4f} is {s / median:.1f}x the median "
                                    f"{median:.4f} (promoted above {rules.promote:g}x)")
    tied = {layer.node for layer in todo if layer.tied_to}
    # a tied head on an 8-bit table is that table: 8 bits whatever the budgets say (they count it once)
    tables = {layer.node: f"INT8: the lm_head reads the 8-bit embedding table's own codes ('{layer.tied_to}', "
                          "llm.embedding_precision = 'int8'): one copy for lookup and head"
              for layer in todo if layer.tied_to in rules.int8_tables}
    if rules.tied_bits == PROMOTED_BITS:  # a separate INT8 head: the profile's choice, ahead of any promotion
        wanted = {**{n: "INT8: the lm_head (profile: lm_head_precision = 'int8')" for n in tied}, **wanted}
    wanted = {**tables, **{n: why for n, why in wanted.items() if n not in tables}}
    promoted, refused = _within_budget(facts, todo, wanted, rules, tables)
    out = []
    for layer in facts.layers:
        if layer.node in keep:
            out.append(Int4Decision(layer.node, 0, keep[layer.node], layer.k, layer.n))
            continue
        head = "; the lm_head, untied from the embedding table" if layer.node in tied else ""
        bits, reason = BITS, refused.get(layer.node, f"INT4 ({rules.setting}){head}")
        if layer.node in promoted:
            bits, reason = PROMOTED_BITS, wanted[layer.node]
        out.append(Int4Decision(layer.node, bits, reason, layer.k, layer.n, sens.get(layer.node),
                                layer.node in tables))
    return tuple(out)


def _kept(layer: LinearFacts, rules: Int4Rules) -> str:
    if layer.weight_type not in FLOAT_WEIGHTS:
        return f"weight type {layer.weight_type} is not float32/float16"
    if layer.tied_to and not rules.quantize_tied:
        return (f"tied to the embedding table of '{layer.tied_to}' (read through '{layer.transpose}'): "
                f"INT4 would store a second copy of its {layer.k * layer.n / 1e6:.1f}M weights beside it; "
                "quantize_tied=True to do it anyway")
    return ""


def linear_bits_per_weight(decisions: Collection[Int4Decision], block_size: int, symmetric: bool) -> float:
    """Average stored bits per weight of the quantized layers (MatMulNBits codes, scales, zero points), an 8-bit
    embedding table's codes apart (a tied head reading them), as the FP16 table is."""
    done = [d for d in decisions if d.quantize and not d.table]
    weights = sum(d.k * d.n for d in done)
    stored = sum(matmulnbits_bytes(d.k, d.n, d.bits, block_size, symmetric) for d in done)
    return 8 * stored / weights if weights else 0.0


def _within_budget(facts: Int4Facts, todo: list[LinearFacts], wanted: dict[str, str], rules: Int4Rules,
                   tables: Collection[str] = ()) -> tuple[set[str], dict[str, str]]:
    """Take the wanted 8-bit layers in priority order while both budgets hold: the quantized layers' average bits
    per weight (``max_linear_bits``) and the whole model (``max_model_bytes``: everything not quantized counted as
    stored, ``fp16_initializers`` at 2 bytes per value). Every quantized layer starts at 4 bits; each promotion
    adds 8-bit's extra bytes. A ``tables`` layer (a tied head on an 8-bit table) is 8 bits whatever the budgets say,
    and its bytes are the table's: in the model, outside the linear layers' average, as an FP16 table is.
    -> (promoted, refused node -> reason)."""
    layers = {layer.node: layer for layer in todo}
    averaged = [layer for layer in todo if layer.node not in tables]
    linear = sum(matmulnbits_bytes(layer.k, layer.n, BITS, rules.block_size, rules.symmetric) for layer in averaged)
    weights = sum(layer.k * layer.n for layer in averaged)
    other = _other_bytes(facts, _matmulnbits_weights(todo, rules), rules)
    other += sum(matmulnbits_bytes(layers[n].k, layers[n].n, PROMOTED_BITS, rules.block_size, rules.symmetric)
                 for n in tables)
    promoted, refused = set(tables), {}
    for node, why in wanted.items():
        if node in tables:
            continue
        layer = layers[node]
        extra = (matmulnbits_bytes(layer.k, layer.n, PROMOTED_BITS, rules.block_size, rules.symmetric)
                 - matmulnbits_bytes(layer.k, layer.n, BITS, rules.block_size, rules.symmetric))
        over = []
        if rules.max_linear_bits is not None and 8 * (linear + extra) > rules.max_linear_bits * weights:
            over.append(f"the linear layers over {rules.max_linear_bits:g} bits per weight (at "
                        f"{8 * linear / weights:.3f})")
        if rules.max_model_bytes is not None and other + linear + extra > rules.max_model_bytes:
            over.append(f"the model over the size budget of {rules.max_model_bytes / 1e6:.1f} MB "
                        f"(at {(other + linear) / 1e6:.1f} MB)")
        if over:
            refused[node] = (f"INT4 ({rules.setting}); {why[len('INT8: '):]}, but 8 bits (+{extra / 1e6:.2f} MB) "
                             f"would take {' and '.join(over)}")
        else:
            promoted.add(node)
            linear += extra
    return promoted, refused


def decide_decoder_precision(model: onnx.ModelProto, int4: Mapping[str, Int4Decision], profile: Profile) -> PrecisionPlan:
    """Every node of a decoder written layer by layer (edgeq.decoder), whose linear layers are already MatMulNBits
    where the plan quantized them: a node ``/<linear>/<op>`` takes the plan's decision for ``<linear>``; the others
    in a stated order: the tied head on the FP16 table, linear layers as planned, embedding, norms, hard rules."""
    spec = profile.llm
    infos = classify(model)
    tables = embedding_tables(model, infos)
    fp16 = spec.embedding_precision == "fp16"
    inputs_of = {n.name: list(n.input) for n in model.graph.node}
    decisions = []
    for info in infos.values():
        name, category, precision, reason = info.name, info.category, "fp32", ""
        parts = name.split("/")
        planned = int4.get(parts[1]) if len(parts) > 2 else None
        node_inputs = inputs_of.get(name, [])
        if info.op_type == "Transpose" and node_inputs and node_inputs[0] in tables:
            category = LM_HEAD
            precision = "fp16" if fp16 else "fp32"
            reason = "tied lm_head: the embedding table read through this transpose, one copy for lookup and head"
        elif info.category == "linear" and planned is not None:
            if parts[1] == HEAD_NAME:
                category = LM_HEAD
            if planned.quantize:
                precision, reason = f"int{planned.bits}", f"linear layer, MatMulNBits: {planned.reason}"
            elif category == LM_HEAD and fp16 and spec.lm_head_precision == "fp16":
                precision = "fp16"
                reason = ("tied lm_head: reads the FP16 embedding table through a transpose, so one FP16 copy "
                          "serves lookup and head (smallest file; profile llm.lm_head_precision = 'fp16')")
            else:
                reason = planned.reason
        elif info.category == "embedding" and info.op_type == "GatherBlockQuantized":
            precision = "int8"
            reason = (f"embedding table at 8 bits, blocks of {spec.block_size} (GatherBlockQuantized; profile "
                      "llm.embedding_precision = 'int8')" + ("; the tied lm_head's MatMulNBits reads the same codes: "
                                                            "one copy" if info.shared_weight else ""))
        elif info.category == "embedding":
            precision, reason = (HARD_RULES["embedding"] if fp16 else
                                 ("fp32", "embedding table: profile sets llm.embedding_precision = 'fp32'"))
        elif info.category == "norm":
            reason = ("RMSNorm (SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization): FP32 compute; "
                      "its scale is 1-D and tiny, and the residual sum it carries feeds the next layer")
        else:
            precision, reason = _hard_rule(info.category)
        checked: Precision = check_implemented(precision, CAUSAL_LM, category, name)
        decisions.append(NodeDecision(name, info.op_type, info.category, info.role, checked, reason))
    return PrecisionPlan(tuple(decisions))


def _hard_rule(category: str) -> tuple[str, str]:
    """A causal LM's other nodes: the encoders' hard rule for the category, computed in FP32 (the FP16 norm rule is
    an encoder's; a causal LM's norms are decided above)."""
    precision, reason = HARD_RULES.get(category, ("fp32", "kept FP32"))
    return ("fp32" if precision == "fp16" else precision), reason


def _matmulnbits_weights(quantized: Collection[LinearFacts], rules: Int4Rules) -> set[str]:
    """The weights the ``quantized`` layers replace with MatMulNBits' own: each one's, but a tied head's table only
    when the table is 8-bit and read by both (a quantized tied head otherwise stores a second copy beside it)."""
    return {layer.weight for layer in quantized if not layer.tied_to or layer.tied_to in rules.int8_tables}


def _other_bytes(facts: Int4Facts, quantized: Collection[str], rules: Int4Rules) -> int:
    """Bytes of every initializer but the ``quantized`` weights, as stored (``fp16_initializers`` at 2 per value,
    ``int8_tables`` as MatMulNBits stores an 8-bit [hidden, vocab] weight; a table a quantized tied head reads is
    among the ``quantized`` weights: counted once, with the head)."""
    hidden = next((layer.k for layer in facts.layers if layer.node == HEAD_NAME), 0)

    def stored(name: str, values: int, size: int) -> int:
        if name in rules.int8_tables and hidden:
            return matmulnbits_bytes(hidden, values // hidden, PROMOTED_BITS, rules.block_size, rules.symmetric)
        return values * (2 if name in rules.fp16_initializers else size)

    return sum(stored(name, values, size) for name, (values, size) in facts.initializer_bytes.items()
               if name not in quantized)


def linear_bytes(decisions: Collection[Int4Decision], block_size: int, symmetric: bool) -> int:
    """Bytes MatMulNBits stores for the quantized layers of a plan."""
    return sum(matmulnbits_bytes(d.k, d.n, d.bits, block_size, symmetric) for d in decisions if d.quantize)


# ---------------------------------------------------------------------------------------- the closest-fix search

# The promotion rungs the closest-fix search tries: the fewest most sensitive INT4 layers whose 8 bits add at least
# this share of the failed plan's linear bytes (each rung doubling the last; the last rung is whatever the size budget
# admits when it stops short). A rung of +2.5% is ~3% more weights at 8 bits (each costs 4.125 bits over INT4's
# 5.125): on SmolLM2 2-3 MLP matrices; +20% reaches past the default 6.5 bits-per-weight budget's room.
FIX_RUNGS = (0.025, 0.05, 0.1, 0.2)


@dataclass(frozen=True)
class FixCandidate:
    """One setting the closest-fix search may build, with the plan an export given it makes from the measured facts
    (``remeasure``: its sensitivities are another block size's or symmetry's, so its plan is measured again first
    and ``plan`` is an estimate for ordering)."""

    setting: str  # KEY=VALUE, as --set takes it
    spec: LLMSpec
    plan: tuple[Int4Decision, ...]
    linear_bytes: int
    remeasure: bool


def with_llm_setting(spec: LLMSpec, setting: str) -> LLMSpec:
    """``spec`` with one ``llm.FIELD=VALUE`` applied as ``--set`` reads it (a float field's integer as a float)."""
    key, value = parse_setting(setting)
    name = key.removeprefix("llm.")
    if typing.get_type_hints(LLMSpec)[name] is float:
        value = float(value)
    return replace(spec, **{name: value})


def fix_candidates(facts: Int4Facts, spec: LLMSpec, tables: frozenset[str]) -> tuple[FixCandidate, ...]:
    """The single settings that may make a package more accurate than ``spec``'s, cheapest first in linear bytes
    (ties in this order): GPTQ after RTN (no bytes), 8-bit K/V, the promotion rungs, asymmetric blocks, half the
    block size. Each is kept only when its plan differs from ``spec``'s and fits the size budget (bits per weight
    and ``max_size_mb``) with every 8-bit layer of ``spec``'s plan; ``facts`` carry sensitivities at ``spec``'s
    block size and symmetry."""
    base = decide_int4(facts, int4_rules(spec, tables))
    seen = {_plan_key(base, spec)}
    base_int8 = {d.node for d in base if d.bits == PROMOTED_BITS}
    out = []
    settings = [*(["llm.int4_method=gptq"] if spec.int4_method == "rtn" else []),
                *(["llm.int8_kv=true"] if not spec.int8_kv else []),
                *(f"llm.promote={p}" for p in _promote_rungs(facts, spec, tables, base)),
                *(["llm.symmetric=false"] if spec.symmetric else []),
                *([f"llm.block_size={spec.block_size // 2}"] if spec.block_size > 16 else [])]
    for setting in settings:
        s = with_llm_setting(spec, setting)
        rules = int4_rules(s, tables)
        plan = decide_int4(facts, rules)
        # a smaller block can fit the budget only by giving up 8-bit layers: a trade, not a step up
        if (_plan_key(plan, s) in seen or not base_int8 <= {d.node for d in plan if d.bits == PROMOTED_BITS}
                or not _fits(facts, plan, rules, s)):
            continue
        seen.add(_plan_key(plan, s))
        out.append(FixCandidate(setting, s, plan, linear_bytes(plan, s.block_size, s.symmetric),
                                s.promote > 0 and (s.block_size, s.symmetric) != (spec.block_size, spec.symmetric)))
    return tuple(sorted(out, key=lambda c: c.linear_bytes))


def _plan_key(plan: Collection[Int4Decision], spec: LLMSpec) -> tuple:
    return tuple(d.bits for d in plan), spec.int4_method, spec.block_size, spec.symmetric


def _fits(facts: Int4Facts, plan: Collection[Int4Decision], rules: Int4Rules, spec: LLMSpec) -> bool:
    """The plan within the size budget as ``decide_int4`` counts it (INT4 alone may not be, at a smaller block)."""
    if linear_bits_per_weight(plan, spec.block_size, spec.symmetric) > spec.max_bits_per_weight:
        return False
    quantized = {d.node for d in plan if d.quantize}
    stored = (_other_bytes(facts, _matmulnbits_weights([x for x in facts.layers if x.node in quantized], rules), rules)
              + linear_bytes(plan, spec.block_size, spec.symmetric))
    return rules.max_model_bytes is None or stored <= rules.max_model_bytes


def _promote_rungs(facts: Int4Facts, spec: LLMSpec, tables: frozenset[str],
                   base: tuple[Int4Decision, ...]) -> list[str]:
    """``llm.promote`` values, each printed with the fewest decimals that give its plan: per ``FIX_RUNGS`` share,
    the lowest multiple of the median sensitivity that promotes the fewest more layers (most sensitive first)
    adding that share of ``base``'s linear bytes, or, past what the budget admits, all it admits."""
    rules = int4_rules(spec, tables)
    sens = {layer.node: layer.sensitivity for layer in facts.layers
            if layer.sensitivity is not None and not _kept(layer, rules)}
    if not sens:
        return []
    median = float(np.median(list(sens.values())))
    bits = {d.node: d.bits for d in base}
    ranked = sorted((s / median for node, s in sens.items() if bits[node] == BITS), reverse=True) if median else []
    start = linear_bytes(base, spec.block_size, spec.symmetric)
    steps = []  # (promote text, extra bytes), as the threshold goes down the ranking
    for j, hi in enumerate(ranked):
        text = _between(ranked[j + 1] if j + 1 < len(ranked) else 0.0, hi)
        if text is not None:
            plan = decide_int4(facts, int4_rules(replace(spec, promote=float(text)), tables))
            steps.append((text, linear_bytes(plan, spec.block_size, spec.symmetric) - start))
    most = max((extra for _, extra in steps), default=0)
    rungs = [next(t for t, extra in steps if extra >= min(share * start, most)) for share in FIX_RUNGS if most > 0]
    return list(dict.fromkeys(rungs))


def _between(lo: float, hi: float) -> str | None:
    """The number with the fewest decimals in [lo, hi), above 0, as text; None when there is none (a tie)."""
    for d in range(9):
        p = math.floor(hi * 10**d) / 10**d
        if p >= hi:
            p -= 10**-d
        if p >= lo and p > 0:
            return f"{p:.{d}f}"
    return None
