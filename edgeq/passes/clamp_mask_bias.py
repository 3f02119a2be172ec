"""ClampMaskBias: replace the float32-minimum constants of the attention-mask path with a moderate bias.

Exporters build the additive mask as ``where(mask == 0, finfo(float32).min, 0)``. Left as is, a quantized tensor
that carries -3.4e38 spends its whole range on it: on MiniLM with 16-bit activations the scores' steps became
~1e34 wide and the mean cosine against FP32 fell to 0.378. Any bias below about -30 already gives exp(bias) < 1e-13
in softmax, so a value like -100 masks as well while keeping the scores' range near their real spread.
Only constants read by nodes that ``categories`` puts on the mask path are touched.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from edgeq.categories import classify
from edgeq.passes.base import PassBase, PassResult

# float16's minimum is -65504; every "minus infinity" stand-in an exporter writes is at or below it.
FLOAT_MIN_LIKE = -6.5e4


class ClampMaskBias(PassBase):
    def __init__(self, bias: float) -> None:
        self.bias = bias

    def call(self, model: onnx.ModelProto) -> PassResult:
        infos = classify(model)
        mask_inputs = {i for n in model.graph.node if infos[n.name].category == "attention_mask" for i in n.input}
        changed = []
        for init in model.graph.initializer:
            if init.name in mask_inputs and _is_float_min(init):
                a = numpy_helper.to_array(init)
                init.CopyFrom(numpy_helper.from_array(np.full(a.shape, self.bias, a.dtype), init.name))
                changed.append(init.name)
        for node in model.graph.node:  # Constant nodes the optimizer did not fold into initializers
            if node.op_type == "Constant" and node.output[0] in mask_inputs:
                for attr in node.attribute:
                    if attr.name == "value" and _is_float_min(attr.t):
                        a = numpy_helper.to_array(attr.t)
                        attr.t.CopyFrom(numpy_helper.from_array(np.full(a.shape, self.bias, a.dtype), attr.t.name))
                        changed.append(node.output[0])
        return PassResult(model, bool(changed), f"{len(changed)} mask constants set to {self.bias}: {', '.join(changed)}")


def _is_float_min(t: onnx.TensorProto) -> bool:
    a = numpy_helper.to_array(t)
    return a.dtype.kind == "f" and a.size > 0 and bool(np.all(a <= FLOAT_MIN_LIKE))
