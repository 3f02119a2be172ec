"""edgeq.policy: the ordered precision rules, with and without a measured sensitivity."""

from __future__ import annotations

import dataclasses
import random

import pytest

from edgeq.categories import NodeInfo
from edgeq.policy import NodeDecision, PrecisionPlan, Sensitivity, decide_precision
from edgeq.policy.encoder import within_size_budget
from edgeq.precision import Precision
from edgeq.profiles import load_profile

LINEAR = [
    (f"/encoder/layer.{layer}/{path}/MatMul", role)
    for layer in (0, 1)
    for path, role in (
        ("attention/self/query", "attn_qkv"),
        ("attention/self/key", "attn_qkv"),
        ("attention/self/value", "attn_qkv"),
        ("attention/output/dense", "attn_out"),
        ("intermediate/dense", "ffn_up"),
        ("output/dense", "ffn_down"),
    )
]
LINEAR_NAMES = [n for n, _ in LINEAR]


def _nodes() -> dict[str, NodeInfo]:
    infos = [
        NodeInfo("/embeddings/word_embeddings/Gather", "Gather", "embedding", ""),
        NodeInfo("/embeddings/position_embeddings/Gather", "Gather", "embedding", ""),
        NodeInfo("/embeddings/LayerNorm/LayerNormalization", "LayerNormalization", "norm", ""),
        NodeInfo("/Unsqueeze", "Unsqueeze", "attention_mask", ""),
        NodeInfo("/Cast", "Cast", "attention_mask", ""),
        NodeInfo("/encoder/layer.0/attention/self/Add", "Add", "attention_mask", ""),
        NodeInfo("/encoder/layer.0/attention/self/Softmax", "Softmax", "softmax", ""),
        NodeInfo("/encoder/layer.0/attention/self/MatMul", "MatMul", "attention_matmul", ""),
        NodeInfo("/encoder/layer.0/output/Add", "Add", "other", ""),
        NodeInfo("/encoder/layer.0/output/LayerNorm/LayerNormalization", "LayerNormalization", "norm", ""),
        *(NodeInfo(n, "MatMul", "linear", r) for n, r in LINEAR),
    ]
    return {i.name: i for i in infos}


@pytest.fixture(scope="module")
def profile():
    """The bundled profile with norms FP16 too (it keeps them FP32 for ARM/x86 agreement): exercises both categories."""
    p = load_profile("android-arm64")
    return dataclasses.replace(p, quantization=dataclasses.replace(p.quantization, keep_fp16=("embedding", "norm")))


def test_bundled_profile_keeps_norms_fp32():
    by = decide_precision(_nodes(), load_profile("android-arm64")).by_name()
    assert by["/embeddings/word_embeddings/Gather"].precision == "fp16"
    assert by["/embeddings/LayerNorm/LayerNormalization"].precision == "fp32"


@pytest.fixture
def nodes():
    return _nodes()


def with_quant(profile, **kw):
    return dataclasses.replace(profile, quantization=dataclasses.replace(profile.quantization, **kw))


# Drops chosen so that the ranking is unambiguous and not the graph order.
DROPS = {name: d for name, d in zip(LINEAR_NAMES, [0.0010, 0.0002, 0.0007, 0.0150, 0.0003, 0.0400,
                                                       0.0001, 0.0005, 0.0009, 0.0080, 0.0004, 0.0220])}
RANKED = sorted(DROPS, key=lambda n: -DROPS[n])


def test_every_node_gets_one_decision_with_a_reason(nodes, profile):
    plan = decide_precision(nodes, profile)
    assert [d.name for d in plan.decisions] == list(nodes)
    for d in plan.decisions:
        info = nodes[d.name]
        assert (d.op_type, d.category, d.role) == (info.op_type, info.category, info.role)
        assert isinstance(d.precision, Precision)
        assert d.reason.strip()
        assert d.sensitivity is None


def test_keep_fp16_embedding_and_norm(nodes, profile):
    by = decide_precision(nodes, profile).by_name()
    for n in nodes.values():
        if n.category in ("embedding", "norm"):
            assert by[n.name].precision == "fp16", n.name


def test_embeddings_and_norms_fp32_when_keep_fp16_is_empty(nodes, profile):
    by = decide_precision(nodes, with_quant(profile, keep_fp16=())).by_name()
    for n in nodes.values():
        if n.category in ("embedding", "norm"):
            assert by[n.name].precision == "fp32", n.name
            assert "does not list" in by[n.name].reason


def test_keep_fp16_is_per_category(nodes, profile):
    by = decide_precision(nodes, with_quant(profile, keep_fp16=("norm",))).by_name()
    assert by["/embeddings/word_embeddings/Gather"].precision == "fp32"
    assert by["/embeddings/LayerNorm/LayerNormalization"].precision == "fp16"


def test_mask_path_softmax_and_the_rest_fp32(nodes, profile):
    by = decide_precision(nodes, profile).by_name()
    for n in nodes.values():
        if n.category in ("attention_mask", "softmax", "attention_matmul", "other"):
            assert by[n.name].precision == "fp32", n.name
    assert "mask" in by["/encoder/layer.0/attention/self/Add"].reason
    assert "softmax" in by["/encoder/layer.0/attention/self/Softmax"].reason


def test_linear_default_is_int8(nodes, profile):
    plan = decide_precision(nodes, profile)
    assert sorted(d.name for d in plan.of("int8")) == sorted(LINEAR_NAMES)
    assert plan.summary() == {
        "attention_mask": {"fp32": 3}, "attention_matmul": {"fp32": 1}, "embedding": {"fp16": 2},
        "linear": {"int8": 12}, "norm": {"fp16": 2}, "other": {"fp32": 1}, "softmax": {"fp32": 1},
    }


def test_hard_rules_are_not_overridden_by_keep_fp32_nodes_or_sensitivity(nodes, profile):
    """A glob or a sensitivity entry that names an fp16 node does not change it: hard rules come first."""
    p = with_quant(profile, keep_fp32_nodes=("/embeddings/*",))
    sens = Sensitivity({"/embeddings/LayerNorm/LayerNormalization": 1.0, **DROPS}, 8)
    by = decide_precision(nodes, p, sens, promote=1).by_name()
    assert by["/embeddings/word_embeddings/Gather"].precision == "fp16"
    assert by["/embeddings/LayerNorm/LayerNormalization"].precision == "fp16"


def test_keep_fp32_nodes_glob(nodes, profile):
    p = with_quant(profile, keep_fp32_nodes=("/encoder/layer.1/*",))
    by = decide_precision(nodes, p).by_name()
    for name in LINEAR_NAMES:
        expected = "fp32" if name.startswith("/encoder/layer.1/") else "int8"
        assert by[name].precision == expected, name
    assert by[LINEAR_NAMES[6]].reason == "profile override: keep_fp32_nodes matches '/encoder/layer.1/*'"


def test_keep_fp32_nodes_wins_over_sensitivity(nodes, profile):
    top = RANKED[0]  # /encoder/layer.0/output/dense/MatMul, the most sensitive
    p = with_quant(profile, keep_fp32_nodes=("*/layer.0/output/dense/*",))
    by = decide_precision(nodes, p, Sensitivity(DROPS, 8), promote=3).by_name()
    assert by[top].precision == "fp32"
    assert "keep_fp32_nodes" in by[top].reason
    assert by[top].sensitivity == DROPS[top]
    # the other two of the top three are still promoted; the override does not shift promotion to rank 4
    assert [by[n].precision for n in RANKED[1:4]] == ["int8-per-token", "int8-per-token", "int8"]


def test_keep_fp32_nodes_glob_is_case_sensitive(nodes, profile):
    p = with_quant(profile, keep_fp32_nodes=("*/QUERY/*",))
    assert all(d.precision == "int8" for d in decide_precision(nodes, p).decisions if d.category == "linear")


@pytest.mark.parametrize("k", [0, 1, 3, 5, 12])
def test_promote_k_gives_exactly_the_k_highest_gains(nodes, profile, k):
    plan = decide_precision(nodes, profile, Sensitivity(DROPS, 16), promote=k)
    promoted = [d.name for d in plan.of("int8-per-token")]
    assert set(promoted) == set(RANKED[:k])
    assert len(plan.of("int8")) == 12 - k
    for d in plan.decisions:
        if d.category == "linear":
            assert d.sensitivity == DROPS[d.name]
            rank = RANKED.index(d.name) + 1
            assert f"rank {rank} of 12" in d.reason
            if d.name in promoted:
                assert d.reason.startswith(f"sensitive: rank {rank} of 12")
                assert f"{DROPS[d.name]:.2e}" in d.reason
                assert "int8-per-token" in d.reason


def test_promote_uses_the_profiles_sensitive_precision(nodes, profile):
    p = with_quant(profile, sensitive_precision="w8a16")
    plan = decide_precision(nodes, p, Sensitivity(DROPS, 16), promote=2)
    assert sorted(d.name for d in plan.of("w8a16") if d.category == "linear") == sorted(RANKED[:2])


def test_a_precision_no_pass_implements_is_never_planned(nodes, profile):
    """Profiles refuse it when they load; a profile built in code that skips that check fails here, not silently."""
    p = with_quant(profile, sensitive_precision="fp16")
    with pytest.raises(ValueError, match="no pass implements 'fp16' for 'linear' nodes in the encoder-cpu recipe"):
        decide_precision(nodes, p, Sensitivity(DROPS, 16), promote=2)


def test_result_does_not_depend_on_sensitivity_dict_order(nodes, profile):
    reference = decide_precision(nodes, profile, Sensitivity(DROPS, 16), promote=4)
    rng = random.Random(0)
    for _ in range(5):
        items = list(DROPS.items())
        rng.shuffle(items)
        assert decide_precision(nodes, profile, Sensitivity(dict(items), 16), promote=4) == reference


def test_ties_are_broken_by_name_whatever_the_order(nodes, profile):
    tied = {name: 0.01 for name in LINEAR_NAMES}
    plans = [decide_precision(nodes, profile, Sensitivity(dict(order), 4), promote=2)
             for order in (sorted(tied.items()), sorted(tied.items(), reverse=True))]
    assert plans[0] == plans[1]
    assert sorted(d.name for d in plans[0].of("int8-per-token")) == sorted(LINEAR_NAMES)[:2]


def test_ranking_sorts_by_drop_then_name():
    s = Sensitivity({"b": 0.1, "a": 0.1, "c": 0.5, "d": 0.0}, 4)
    assert s.ranking() == ["c", "a", "b", "d"]


def test_plan_helpers():
    d1 = NodeDecision("a", "MatMul", "linear", "ffn_up", "int8", "r")
    d2 = NodeDecision("b", "Gather", "embedding", "", "fp16", "r")
    plan = PrecisionPlan((d1, d2))
    assert plan.by_name() == {"a": d1, "b": d2}
    assert plan.of("fp16") == [d2]
    assert plan.summary() == {"embedding": {"fp16": 1}, "linear": {"int8": 1}}


def test_within_size_budget_packages_the_most_promoted_count_that_fits():
    assert within_size_budget(12, 36, lambda k: True) == (12, "")
    k, why = within_size_budget(12, 36, lambda k: k <= 6)  # 8, 10 and 12 do not fit
    assert k == 6 and why == ("the targets need 12 layers promoted, over the size budget: 6 is the most promoted count "
                              "that fits")
    # nothing fits: the targets' count, for the size check to report
    assert within_size_budget(12, 36, lambda k: False) == (12, "no promotion count fits the size budget")
    asked = []
    within_size_budget(12, 36, lambda k: asked.append(k) or k <= 8)
    assert asked == [12, 10, 8]  # downward from the targets' count, stopping at the first that fits
