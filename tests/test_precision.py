"""edgeq.precision: every precision the policy can plan names the pass that carries it out, per recipe kind."""

from __future__ import annotations

import pytest

from edgeq.categories import CATEGORIES
from edgeq.precision import (CAUSAL_LM, ENCODER_CPU, ENCODER_QNN, KINDS, LM_HEAD, PASSES, Precision, allowed,
                             check_implemented, implemented_by)


def test_values_are_the_strings_manifests_record():
    assert [str(p) for p in Precision] == ["int4", "int8", "int8-weight-only", "int8-per-token", "w8a16", "w8a8", "w16a16", "w16a8",
                                           "w16", "w8", "a16", "a8", "fp16", "fp32"]
    assert Precision("w8a16") == "w8a16" and f"{Precision.INT8_WEIGHT_ONLY}" == "int8-weight-only"


def test_every_kind_covers_every_category_and_every_precision_is_used():
    for kind in KINDS:
        for category in CATEGORIES:
            assert allowed(kind, category), (kind, category)
    used = {p for table in PASSES.values() for p in table}
    assert used == set(Precision)
    assert all(pass_name for table in PASSES.values() for pass_name in table.values())


@pytest.mark.parametrize("precision, kind, category, pass_name", [
    ("int8", ENCODER_CPU, "linear", "QuantizeLinearLayers"),
    ("w8a16", ENCODER_CPU, "linear", "QuantizeLinearLayers"),
    ("fp16", ENCODER_CPU, "norm", "KeepFp16"),
    ("int8", CAUSAL_LM, "linear", "edgeq/decoder/layerwise.py"),
    ("fp16", CAUSAL_LM, LM_HEAD, "write_decoder"),
    ("fp16", CAUSAL_LM, "embedding", "write_decoder"),
    ("w16a16", ENCODER_QNN, "linear", "write_qdq"),
    ("fp32", ENCODER_CPU, "linear", "stays as exported"),
])
def test_implemented_by_names_the_pass(precision, kind, category, pass_name):
    assert pass_name in implemented_by(precision, kind, category)


@pytest.mark.parametrize("precision, kind, category", [
    ("fp16", ENCODER_CPU, "linear"),  # the profile value that used to do nothing
    ("w16a16", ENCODER_CPU, "linear"),
    ("int4", ENCODER_CPU, "linear"),
    ("fp16", ENCODER_CPU, "softmax"),
    ("fp16", CAUSAL_LM, "norm"),
    ("fp32", ENCODER_QNN, "linear"),  # HTP runs no float ops
])
def test_not_implemented(precision, kind, category):
    assert implemented_by(precision, kind, category) is None
    with pytest.raises(ValueError, match=f"node: no pass implements '{precision}' for '{category}' nodes in the {kind} "
                                         f"recipe \\(implemented: "):
        check_implemented(precision, kind, category, "node")


def test_check_implemented_returns_the_enum():
    assert check_implemented("int8-weight-only", ENCODER_CPU, "linear", "n") is Precision.INT8_WEIGHT_ONLY
