"""edgeq.policy.causal_lm: INT4 bits per layer and every node's precision, decided from measurements before any
pass. The stored expectations (expected_llm_plans.json) were written by the code before the policy owned these
decisions (QuantizeInt4.plan and decide_llm_precision over the quantized graph); the plans must stay the same."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from edgeq.categories import embedding_tables
from edgeq.llm.activations import collect_activation_stats
from edgeq.llm.int4 import measure_int4
from edgeq.policy import Int4Rules, decide_causal_lm, decide_int4, decide_llm_precision, int4_rules
from edgeq.policy.causal_lm import linear_bits_per_weight
from edgeq.precision import Precision
from edgeq.profiles import load_profile

from . import llm_cases as C

# Sensitivities come from FP32 activations: another CPU's ONNX Runtime kernels move them in the last bits (2.7e-9
# relative measured between two machines with onnxruntime 1.32); the plans themselves must not move.
SENSITIVITY_REL = 1e-6
EXPECTED = json.loads((Path(__file__).parent / "expected_llm_plans.json").read_text())


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """untie -> (fused model, its measurements with and without sensitivities)."""
    folder = tmp_path_factory.mktemp("llm-cases")
    out = {}
    for untie in (False, True):
        model = C.fused_tiny_llama(folder, untie)
        stats = collect_activation_stats(model, C.windows())
        out[untie] = (model, measure_int4(model, stats, 32, False), measure_int4(model, stats, 32, False, False))
    return out


def _profile(head: str):
    # The stored plans were written under an absolute 150 MB cap a tiny model never reaches. The relative budget
    # would bind here: the tiny layers' 8-bit K/V alone put them at 6.04 bits per weight, near the default 6.5.
    return load_profile("android-arm64", overrides={"llm.lm_head_precision": head, "llm.max_bits_per_weight": 32.0})


def _as_rows(int4, nodes):
    return ([[d.node, d.bits, d.reason, d.k, d.n, d.sensitivity] for d in int4],
            [[d.name, d.op_type, d.category, d.role, str(d.precision), d.reason] for d in nodes.decisions])


@pytest.mark.parametrize("case", list(C.CASES))
@pytest.mark.encoders
def test_plans_equal_the_stored_expectations(measured, case):
    untie, rules = C.CASES[case]
    want = EXPECTED[case]
    model, facts, plain = measured[untie]
    rules = {**rules, "max_model_bytes": want["max_model_bytes"]}
    if rules.get("int8_nodes") is not None:
        rules["int8_nodes"] = frozenset(rules["int8_nodes"])
    sensitive = rules.get("promote", 2.0) is not None and rules.get("int8_nodes") is None
    int4 = decide_int4(facts if sensitive else plain, Int4Rules(
        setting=C.SETTING, fp16_initializers=frozenset(embedding_tables(model)), **rules))
    nodes = decide_llm_precision(model, int4, _profile(want["lm_head_precision"]))
    got_int4, got_nodes = _as_rows(int4, nodes)
    assert [r[:5] for r in got_int4] == [r[:5] for r in want["int4"]]
    for got, exp in zip(got_int4, want["int4"]):
        assert got[5] == exp[5] if exp[5] is None else got[5] == pytest.approx(exp[5], rel=SENSITIVITY_REL), got[0]
    assert got_nodes == want["nodes"]


@pytest.mark.parametrize("case, head", [("default", "fp16"), ("head-int8", "int8"), ("head-int4", "int4")])
@pytest.mark.encoders
def test_the_profile_gives_the_same_plan(measured, case, head):
    """decide_causal_lm derives its rules from the profile (what the chain runs) and plans the same."""
    model, facts, _ = measured[C.CASES[case][0]]
    plan = decide_causal_lm(model, facts, _profile(head))
    got_int4, got_nodes = _as_rows(plan.int4, plan.nodes)
    want = EXPECTED[case]["int4"]
    assert [r[:5] for r in got_int4] == [r[:5] for r in want]
    assert [r[5] for r in got_int4] == [None if e is None else pytest.approx(e, rel=SENSITIVITY_REL) for e in
                                        (r[5] for r in want)]
    assert got_nodes == EXPECTED[case]["nodes"]


def test_rules_from_the_profile():
    profile = _profile("int8")
    model = None
    rules = int4_rules(dataclasses.replace(profile.llm, embedding_precision="fp32", promote=0.0), model)
    assert (rules.quantize_tied, rules.tied_bits, rules.promote, rules.fp16_initializers) == (True, 8, None, frozenset())
    assert rules.max_model_bytes is None and rules.max_linear_bits == 32.0 and rules.setting == C.SETTING
    capped = int4_rules(dataclasses.replace(profile.llm, max_size_mb=150.0, max_bits_per_weight=6.5), None)
    assert (capped.max_model_bytes, capped.max_linear_bits) == (150_000_000, 6.5)


@pytest.mark.encoders
def test_promotions_stop_at_the_bits_per_weight_budget(measured):
    """Promotion above the median (promote=1) under a 6.5 bits-per-weight budget: the tiny model's K/V at 8 bits
    already put it at 6.04, so only the promotions that fit are taken, and the refused ones say why."""
    model, facts, _ = measured[False]
    rules = Int4Rules(setting=C.SETTING, promote=1.0, max_linear_bits=6.5,
                      fp16_initializers=frozenset(embedding_tables(model)))
    unbounded = decide_int4(facts, dataclasses.replace(rules, max_linear_bits=None))
    bounded = decide_int4(facts, rules)
    assert 6.04 < linear_bits_per_weight(bounded, 32, False) <= 6.5 < linear_bits_per_weight(unbounded, 32, False)
    refused = [d for d in bounded if d.bits == 4 and "the linear layers over 6.5 bits per weight" in d.reason]
    assert refused and all(u.bits == 8 for u in unbounded if u.node in {d.node for d in refused})


@pytest.mark.encoders
def test_a_quantized_layer_carries_the_name_quantize_int4_gives_it(measured):
    model, facts, _ = measured[False]
    plan = decide_causal_lm(model, facts, _profile("fp16"))
    named = {d.name: d for d in plan.nodes.decisions}
    for d in plan.int4:
        if d.quantize:
            assert named[f"{d.node}_Q{d.bits}"].precision == Precision(f"int{d.bits}")
            assert named[f"{d.node}_Q{d.bits}"].op_type == "MatMulNBits"
        elif named[d.node].precision == Precision.FP16:  # the tied head, computed on the shared FP16 table
            assert named[d.node].reason.startswith("tied lm_head") and "embedding table" in d.reason
        else:
            assert named[d.node].precision == Precision.FP32 and named[d.node].reason == d.reason


@pytest.mark.encoders
def test_budget_takes_promotions_in_priority_order(measured):
    """K/V projections first, then by sensitivity; whatever does not fit says so with the numbers."""
    model, facts, _ = measured[False]
    rules = Int4Rules(setting=C.SETTING, promote=1.0, max_model_bytes=EXPECTED["tight-budget"]["max_model_bytes"],
                      fp16_initializers=frozenset(embedding_tables(model)))
    int4 = decide_int4(facts, rules)
    eight = [d for d in int4 if d.bits == 8]
    refused = [d for d in int4 if "size budget" in d.reason]
    assert len(eight) == 1 and "KV cache" in eight[0].reason
    assert refused and all(d.bits == 4 and "would take the model over the size budget" in d.reason for d in refused)
    assert any("KV cache" in d.reason for d in refused) and any("median" in d.reason for d in refused)
