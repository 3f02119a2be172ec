"""edgeq.policy.causal_lm: INT4 bits per layer and every node's precision, decided from what edgeq.decoder.layerwise
measured on a tiny checkpoint, before any layer is quantized. The stored expectations (expected_llm_plans.json) were
written by llm_cases.py; the plans must stay the same (its docstring: how they compare with the removed whole-graph
path's plans)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from edgeq.policy import Int4Rules, decide_int4, int4_rules
from edgeq.policy.causal_lm import (FIX_RUNGS, _between, fix_candidates, linear_bits_per_weight, linear_bytes,
                                    with_llm_setting)
from edgeq.precision import Precision

from . import llm_cases as C

# Sensitivities come from FP32 activations: another CPU's ONNX Runtime kernels move them in the last bits (2.7e-9
# relative measured between two machines with onnxruntime 1.32); the plans themselves must not move.
SENSITIVITY_REL = 1e-6
EXPECTED = json.loads(C.EXPECTED_FILE.read_text())


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> C.Measurements:
    return C.measure_tiny(tmp_path_factory.mktemp("llm-cases"))


@pytest.fixture(scope="module")
def planned(measured, tmp_path_factory):
    """case -> (INT4 decisions, every node's decision in the package written from them)."""
    out = {}
    for case, (_, head) in C.CASES.items():
        rules = C.rules_of(case, EXPECTED[case]["max_model_bytes"])
        int4 = decide_int4(C.facts_for(measured, rules), rules)
        out[case] = int4, C.node_plan(measured, int4, head, tmp_path_factory.mktemp(case))
    return out


def _assert_int4_rows(got: list, want: list) -> None:
    assert [r[:5] for r in got] == [r[:5] for r in want]
    for g, w in zip(got, want):
        assert g[5] == w[5] if w[5] is None else g[5] == pytest.approx(w[5], rel=SENSITIVITY_REL), g[0]


@pytest.mark.parametrize("case", list(C.CASES))
def test_plans_equal_the_stored_expectations(planned, case):
    got = C.as_rows(*planned[case])
    _assert_int4_rows(got["int4"], EXPECTED[case]["int4"])
    assert got["nodes"] == EXPECTED[case]["nodes"]


@pytest.mark.parametrize("case, head", [("default", "fp16"), ("head-int8", "int8"), ("head-int4", "int4")])
def test_the_profile_gives_the_same_plan(measured, case, head):
    """int4_rules derives from the profile the rules the cases spell out (what the recipe runs), so the same plan."""
    rules = int4_rules(C.profile(head).llm, C.TABLES)
    assert rules.setting == C.SETTING and rules.fp16_initializers == C.TABLES
    _assert_int4_rows(C.as_rows(decide_int4(measured.measured.facts, rules))["int4"], EXPECTED[case]["int4"])


def test_rules_from_the_profile():
    profile = C.profile("int8")
    rules = int4_rules(dataclasses.replace(profile.llm, embedding_precision="fp32", promote=0.0), C.TABLES)
    assert (rules.quantize_tied, rules.tied_bits, rules.promote) == (True, 8, None)
    assert rules.fp16_initializers == frozenset()
    assert rules.max_model_bytes is None and rules.max_linear_bits == 32.0 and rules.setting == C.SETTING
    capped = int4_rules(dataclasses.replace(profile.llm, max_size_mb=150.0, max_bits_per_weight=6.5))
    assert (capped.max_model_bytes, capped.max_linear_bits) == (150_000_000, 6.5)


def test_promotions_stop_at_the_bits_per_weight_budget(measured):
    """Promotion above the median (promote=1) under a 6.5 bits-per-weight budget: the tiny model's K/V at 8 bits
    already put it at 6.04, so only the promotions that fit are taken, and the refused ones say why."""
    rules = Int4Rules(setting=C.SETTING, promote=1.0, max_linear_bits=6.5, fp16_initializers=C.TABLES)
    facts = measured.measured.facts
    unbounded = decide_int4(facts, dataclasses.replace(rules, max_linear_bits=None))
    bounded = decide_int4(facts, rules)
    assert 6.04 < linear_bits_per_weight(bounded, 32, False) <= 6.5 < linear_bits_per_weight(unbounded, 32, False)
    refused = [d for d in bounded if d.bits == 4 and "the linear layers over 6.5 bits per weight" in d.reason]
    assert refused and all(u.bits == 8 for u in unbounded if u.node in {d.node for d in refused})


def test_each_linear_layer_carries_its_decision_under_its_graph_name(planned):
    """A planned layer's nodes are /<layer>/MatMulNBits at its bits, a kept one /<layer>/MatMul with the plan's
    reason; the tied head is the FP16 table's transpose."""
    for case in ("default", "head-int8"):
        int4, nodes = planned[case]
        named = {d.name: d for d in nodes.decisions}
        for d in int4:
            if d.quantize:
                node = named[f"/{d.node}/MatMulNBits"]
                assert (node.op_type, node.precision) == ("MatMulNBits", Precision(f"int{d.bits}"))
                assert node.reason == f"linear layer, MatMulNBits: {d.reason}"
            elif d.node == "lm_head":  # tied and kept: computed on the shared FP16 table
                assert named["/lm_head/MatMul"].precision == Precision.FP16 and "embedding table" in d.reason
                assert named["/lm_head/Transpose"].precision == Precision.FP16
            else:
                assert named[f"/{d.node}/MatMul"].precision == Precision.FP32
                assert named[f"/{d.node}/MatMul"].reason == d.reason


def test_kv_projections_and_sensitivity_promotion(measured):
    """The packed QKV projection writes the KV cache, so it is the K/V layer taken to 8 bits; promotion by
    sensitivity takes exactly the layers above promote x the median; named layers override both."""
    facts = measured.measured.facts
    assert [f.node for f in facts.layers if f.kv_cache] == ["model.layers.0.attn.qkv_proj",
                                                             "model.layers.1.attn.qkv_proj"]
    default = decide_int4(facts, Int4Rules(setting=C.SETTING, promote=None, fp16_initializers=C.TABLES))
    assert {d.node for d in default if d.bits == 8} == {f.node for f in facts.layers if f.kv_cache}
    assert all("KV cache" in d.reason for d in default if d.bits == 8)
    promoted = decide_int4(facts, Int4Rules(setting=C.SETTING, int8_kv=False, promote=1.0, fp16_initializers=C.TABLES))
    decided = [d for d in promoted if d.quantize]
    median = np.median([d.sensitivity for d in decided])
    assert all((d.bits == 8) == (d.sensitivity > median) for d in decided)
    assert 0 < sum(d.bits == 8 for d in decided) < len(decided)
    down = "model.layers.1.mlp.down_proj"
    named = decide_int4(facts, Int4Rules(setting=C.SETTING, int8_nodes=frozenset({down}), fp16_initializers=C.TABLES))
    assert [d.node for d in named if d.bits == 8] == [down]


def test_budget_takes_promotions_in_priority_order(measured):
    """K/V projections first, then by sensitivity; whatever does not fit says so with the numbers."""
    rules = Int4Rules(setting=C.SETTING, promote=1.0, max_model_bytes=EXPECTED["tight-budget"]["max_model_bytes"],
                      fp16_initializers=C.TABLES)
    int4 = decide_int4(measured.measured.facts, rules)
    eight = [d for d in int4 if d.bits == 8]
    refused = [d for d in int4 if "size budget" in d.reason]
    assert len(eight) == 1 and "KV cache" in eight[0].reason
    assert refused and all(d.bits == 4 and "would take the model over the size budget" in d.reason for d in refused)
    assert any("KV cache" in d.reason for d in refused) and any("median" in d.reason for d in refused)
    free = decide_int4(measured.measured.facts, dataclasses.replace(rules, max_model_bytes=None))
    assert sum(d.bits == 8 for d in free) == len(refused) + 1  # every refused one is taken without the budget


def _model_bytes(facts, plan, table_bytes: int) -> int:
    """The model as stored: every initializer no quantized layer replaces (the embedding table at
    ``table_bytes``, the rest as measured), plus MatMulNBits' bytes of the quantized layers but a shared table."""
    replaced = {f.weight for f in facts.layers if not f.tied_to}
    other = sum(v * b for n, (v, b) in facts.initializer_bytes.items() if n not in replaced and n not in C.TABLES)
    return other + table_bytes + linear_bytes([d for d in plan if not d.table], 32, False)


def test_a_tied_head_on_an_8_bit_table_is_the_table(measured):
    """llm.embedding_precision = 'int8': the tied head is 8 bits whatever the budgets say, its bytes counted once
    in the model (the table's: MatMulNBits' 8-bit codes, scales and zero points) and outside the linear average."""
    from edgeq.policy.causal_lm import matmulnbits_bytes

    facts = measured.measured.facts
    head = next(f for f in facts.layers if f.node == "lm_head")
    fp16 = Int4Rules(setting=C.SETTING, promote=None, fp16_initializers=C.TABLES)
    int8 = dataclasses.replace(fp16, fp16_initializers=frozenset(), int8_tables=C.TABLES, quantize_tied=True,
                               tied_bits=8)
    base, shared = decide_int4(facts, fp16), decide_int4(facts, int8)
    (d,) = [d for d in shared if d.node == "lm_head"]
    assert (d.bits, d.table) == (8, True) and "own codes" in d.reason
    assert linear_bits_per_weight(shared, 32, False) == linear_bits_per_weight(base, 32, False)
    kv = {f.node for f in facts.layers if f.kv_cache}
    assert {x.node for x in shared if x.bits == 8 and not x.table} == kv == {x.node for x in base if x.bits == 8}
    # a model budget of exactly this plan's bytes takes it; a byte less refuses the second K/V projection, and a
    # bits-per-weight budget below INT4 still leaves the table at 8 bits
    size = _model_bytes(facts, shared, matmulnbits_bytes(head.k, head.n, 8, 32, False))
    assert decide_int4(facts, dataclasses.replace(int8, max_model_bytes=size)) == shared
    tight = decide_int4(facts, dataclasses.replace(int8, max_model_bytes=size - 1))
    assert sum(x.bits == 8 and not x.table for x in tight) == len(kv) - 1 and [x.bits for x in tight if x.table] == [8]
    starved = decide_int4(facts, dataclasses.replace(int8, max_linear_bits=1.0))
    assert [(x.node, x.bits) for x in starved if x.bits == 8] == [("lm_head", 8)]


def test_a_quantized_tied_head_on_a_float_table_is_a_second_copy(measured):
    """lm_head_precision int8 on the FP16 table: the model's bytes count the table and the head's own copy."""
    facts = measured.measured.facts
    head = next(f for f in facts.layers if f.node == "lm_head")
    rules = Int4Rules(setting=C.SETTING, promote=None, int8_kv=False, fp16_initializers=C.TABLES,
                      quantize_tied=True, tied_bits=8)
    free = decide_int4(facts, rules)
    assert [d.bits for d in free if d.node == "lm_head"] == [8]
    size = _model_bytes(facts, free, 2 * head.k * head.n)
    assert decide_int4(facts, dataclasses.replace(rules, max_model_bytes=size)) == free
    refused = decide_int4(facts, dataclasses.replace(rules, max_model_bytes=size - 1))
    assert [d.bits for d in refused if d.node == "lm_head"] == [4]


# ------------------------------------------------------------------------------------ the closest-fix candidates


def test_fix_candidates_are_single_settings_cheapest_first_within_the_budget(measured):
    """From an RTN, symmetric export without 8-bit K/V: every setting it did not use, each a plan the export given it
    makes (the promote values as printed), more accurate by construction (no 8-bit layer given up), within the
    6.5 bits-per-weight budget and ordered by the bytes it adds."""
    facts = measured.measured.facts
    spec = dataclasses.replace(C.profile("fp16").llm, int4_method="rtn", symmetric=True, int8_kv=False,
                               max_bits_per_weight=6.5)
    candidates = fix_candidates(facts, spec, C.TABLES)
    settings = [c.setting for c in candidates]
    assert settings[0] == "llm.int4_method=gptq"  # no bytes: the same bits, another method
    assert [d.bits for d in candidates[0].plan] == [d.bits for d in decide_int4(facts, int4_rules(spec, C.TABLES))]
    assert {"llm.int8_kv=true", "llm.symmetric=false"} <= set(settings)
    assert any(s.startswith("llm.promote=") for s in settings)
    assert [c.linear_bytes for c in candidates] == sorted(c.linear_bytes for c in candidates)
    for c in candidates:
        assert c.spec == with_llm_setting(spec, c.setting)
        assert linear_bits_per_weight(c.plan, c.spec.block_size, c.spec.symmetric) <= 6.5, c.setting
        # another block size or symmetry: other sensitivities, measured before the plan
        assert c.remeasure == c.setting.startswith(("llm.symmetric=", "llm.block_size=")), c.setting
        if not c.remeasure:  # the printed value gives the plan
            assert decide_int4(facts, int4_rules(c.spec, C.TABLES)) == c.plan
    assert "llm.block_size=16" in settings  # symmetric block 16 stores 6 bits per INT4 weight: within 6.5
    # asymmetric, 6.25 bits: within 6.5 only by giving up the 8-bit K/V layers, so not offered
    default = dataclasses.replace(C.profile("fp16").llm, max_bits_per_weight=6.5)
    assert not any(c.setting.startswith("llm.block_size=") for c in fix_candidates(facts, default, C.TABLES))
    unbounded = dataclasses.replace(default, max_bits_per_weight=32.0)
    assert "llm.block_size=16" in [c.setting for c in fix_candidates(facts, unbounded, C.TABLES)]


def test_promote_rungs_add_the_most_sensitive_layers_by_the_bytes_they_cost(measured):
    facts = measured.measured.facts
    spec = dataclasses.replace(C.profile("fp16").llm, max_bits_per_weight=32.0)
    base = decide_int4(facts, int4_rules(spec, C.TABLES))
    start = linear_bytes(base, 32, False)
    rungs = [c for c in fix_candidates(facts, spec, C.TABLES) if c.setting.startswith("llm.promote=")]
    assert len(rungs) >= 3
    sens = {f.node: f.sensitivity for f in facts.layers if f.sensitivity is not None}
    for share, c in zip(FIX_RUNGS, rungs):
        added = {d.node for d in c.plan if d.bits == 8} - {d.node for d in base if d.bits == 8}
        assert c.linear_bytes - start >= share * start  # at least the rung's share...
        untouched = [sens[d.node] for d in c.plan if d.bits == 4 and d.node in sens]
        assert min(sens[n] for n in added) > max(untouched)  # ...of the most sensitive layers only
        value = c.setting.split("=")[1]  # the fewest decimals that give exactly this plan
        assert len(value.split(".")[-1]) <= 8 and float(value) > 0


def test_between_prints_the_shortest_number_that_separates_two_ratios():
    assert _between(1.5, 2.7) == "2" and _between(2.0, 2.7) == "2" and _between(2.05, 2.07) == "2.06"
    assert _between(0.0, 0.3) == "0.2" and _between(0.0, 1e-12) is None and _between(1.2, 1.2) is None
    assert _between(2.0, 2.0000001) == "2"
