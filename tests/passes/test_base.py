"""edgeq.passes.base: passes work on a copy, and run_passes names the pass that failed and the ones before it."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from edgeq.errors import EdgeqError, PassError
from edgeq.passes.base import PassBase, PassResult, run_passes


def tiny_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", [x], [y])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


class Rename(PassBase):
    """Mutates the model it is given (as passes may: __call__ hands them a copy)."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix

    def call(self, model):
        for n in model.graph.node:
            n.name += self.suffix
        model.graph.name = "changed"
        return PassResult(model, True, f"renamed with {self.suffix}")


class Noop(PassBase):
    def call(self, model):
        return PassResult(model, False, "nothing")


class Boom(PassBase):
    def call(self, model):
        model.graph.node[0].name = "half-edited"
        raise ValueError("graph has a cycle")




class Refuses(PassBase):
    def call(self, model):
        raise PassError("already a PassError", "its own hint")


def test_pass_does_not_mutate_its_input():
    model = tiny_model()
    before = model.SerializeToString()
    result = Rename("_a")(model)
    assert model.SerializeToString() == before
    assert model.graph.node[0].name == "relu"
    assert result.model is not model
    assert result.model.graph.node[0].name == "relu_a"
    assert result.modified and result.summary == "renamed with _a"


def test_failing_pass_does_not_mutate_its_input():
    model = tiny_model()
    before = model.SerializeToString()
    with pytest.raises(ValueError):
        Boom()(model)
    assert model.SerializeToString() == before


def test_pass_name_is_the_class_name():
    assert Rename("x").name == "Rename"
    assert Noop().name == "Noop"


def test_run_passes_chains_results_in_order():
    model = tiny_model()
    out, results = run_passes(model, [Rename("_a"), Noop(), Rename("_b")])
    assert out.graph.node[0].name == "relu_a_b"
    assert [r.modified for r in results] == [True, False, True]
    assert results[-1].model is out
    assert model.graph.node[0].name == "relu"  # the caller's model is untouched


def test_run_passes_with_no_passes_returns_the_model():
    model = tiny_model()
    out, results = run_passes(model, [])
    assert out is model and results == []


def test_run_passes_reraises_as_pass_error_naming_the_pass_and_those_before():
    model = tiny_model()
    with pytest.raises(PassError) as exc:
        run_passes(model, [Rename("_a"), Noop(), Boom(), Rename("_never")])
    err = exc.value
    assert err.message == "error in pass Boom after passes [Rename, Noop]: graph has a cycle"
    assert "edgeq bug" in err.hint
    assert isinstance(err.__cause__, ValueError)
    assert isinstance(err, EdgeqError) and err.exit_code == 1
    assert model.graph.node[0].name == "relu"


def test_first_pass_failing_names_no_previous_passes():
    with pytest.raises(PassError, match=r"^error in pass Boom after passes \[\]: graph has a cycle$"):
        run_passes(tiny_model(), [Boom()])


def test_pass_error_from_a_pass_is_passed_through_unchanged():
    with pytest.raises(PassError) as exc:
        run_passes(tiny_model(), [Noop(), Refuses()])
    assert exc.value.message == "already a PassError"
    assert exc.value.hint == "its own hint"


def test_base_call_is_abstract():
    with pytest.raises(NotImplementedError):
        PassBase()(tiny_model())
