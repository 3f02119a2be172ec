"""FixStaticShapes: give every graph input a fixed shape (HTP graphs are compiled for one shape).

An encoder's inputs are [batch, sequence] token tensors; their two symbolic dimensions become ``batch_size`` and
``seq_len`` everywhere they appear, and the outputs' shapes are fixed to match. Any other symbolic input dimension
has no value a profile could give it, so it is refused with its name rather than guessed.
"""

from __future__ import annotations

import onnx
from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_dim_param_fixed

from edgeq.errors import UnsupportedModelError
from edgeq.passes.base import PassBase, PassResult


class FixStaticShapes(PassBase):
    def __init__(self, batch_size: int, seq_len: int) -> None:
        self.batch_size, self.seq_len = batch_size, seq_len

    def call(self, model: onnx.ModelProto) -> PassResult:
        values: dict[str, int] = {}
        inits = {i.name for i in model.graph.initializer}
        for inp in model.graph.input:
            if inp.name in inits:
                continue
            dims = inp.type.tensor_type.shape.dim
            dynamic = [(axis, d.dim_param) for axis, d in enumerate(dims) if not d.HasField("dim_value")]
            if dynamic and (len(dims) != 2 or not all(p for _, p in dynamic)):
                named = ", ".join(f"{p or '?'} (axis {a})" for a, p in dynamic)
                raise UnsupportedModelError(
                    f"input '{inp.name}' of rank {len(dims)} has dynamic dimension(s) {named}; only [batch, sequence] "
                    f"token inputs can be fixed, and the QNN HTP backend compiles one static shape",
                    "export the model with fixed input shapes, or use a CPU profile such as android-arm64")
            for axis, param in dynamic:
                values.setdefault(param, self.batch_size if axis == 0 else self.seq_len)
        for name, value in values.items():
            make_dim_param_fixed(model.graph, name, value)
        if values:
            fix_output_shapes(model)
        return PassResult(model, bool(values), ", ".join(f"{k}={v}" for k, v in values.items()))
