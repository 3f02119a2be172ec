"""edgeq.passes.name_nodes: every node ends with a unique, non-empty name; named unique nodes are left alone."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from edgeq.passes.name_nodes import NameNodes


def chain(names: list[str], op: str = "Relu") -> onnx.ModelProto:
    """x -> op -> op -> ... -> y, one node per entry of names."""
    tensors = ["x"] + [f"t{i}" for i in range(len(names) - 1)] + ["y"]
    nodes = [helper.make_node(op, [tensors[i]], [tensors[i + 1]], name=n) for i, n in enumerate(names)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])


def names(model) -> list[str]:
    return [n.name for n in model.graph.node]


@pytest.mark.parametrize(
    "before",
    [
        ["", "", ""],
        ["a", "a", "a"],
        ["", "Relu_0", ""],  # a generated name that collides with an existing one
        ["Relu_1", "", "Relu_1"],
        ["a", "a_1", "a", "a_1_2", ""],  # suffixes that collide with existing names
        ["x", "", "x", "", "Relu_1_3"],
    ],
)
def test_names_become_unique_and_non_empty(before):
    model = chain(before)
    result = NameNodes()(model)
    after = names(result.model)
    assert all(after)
    assert len(set(after)) == len(after)
    assert result.modified
    assert names(model) == before  # input not mutated
    renamed = sum(a != b for a, b in zip(after, before))
    assert result.summary == f"{renamed} nodes renamed"


def test_duplicates_keep_the_first_name_and_suffix_the_rest():
    result = NameNodes()(chain(["a", "b", "a", "a"]))
    assert names(result.model) == ["a", "b", "a_2", "a_3"]


def test_empty_names_get_op_type_and_index():
    result = NameNodes()(chain(["", "keep", ""]))
    assert names(result.model) == ["Relu_0", "keep", "Relu_2"]


def test_already_unique_names_are_unchanged():
    model = chain(["a", "b", "c"])
    result = NameNodes()(model)
    assert result.modified is False
    assert result.summary == "0 nodes renamed"
    assert result.model.SerializeToString() == model.SerializeToString()


def test_renaming_keeps_the_graph_valid_and_wiring_intact():
    model = chain(["", "", "dup", "dup"])
    result = NameNodes()(model)
    onnx.checker.check_model(result.model, full_check=True)
    assert [(list(n.input), list(n.output)) for n in result.model.graph.node] == \
        [(list(n.input), list(n.output)) for n in model.graph.node]


def test_is_idempotent():
    once = NameNodes()(chain(["", "a", "a", ""])).model
    twice = NameNodes()(once)
    assert twice.modified is False
    assert names(twice.model) == names(once)
