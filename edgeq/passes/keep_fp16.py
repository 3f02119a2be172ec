"""KeepFp16: store embedding tables in FP16 and compute normalizations in FP16, as the plan says.

Embedding Gather: the table becomes FP16 and a Cast back to float follows the lookup (Gather is type-agnostic,
so the lookup itself reads half the bytes). LayerNormalization: input cast to FP16, scale/bias stored FP16, output
cast back; ONNX Runtime's CPU EP has an FP16 LayerNormalization kernel, so the graph still runs on the CPU EP.
A table that another node also reads in FP32 is left alone (never store the same weights twice).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.passes.base import PassBase, PassResult
from edgeq.policy import PrecisionPlan

FP16_NORM_OPS = ("LayerNormalization",)


class KeepFp16(PassBase):
    def __init__(self, plan: PrecisionPlan) -> None:
        self.plan = plan

    def call(self, model: onnx.ModelProto) -> PassResult:
        g = model.graph
        fp16_nodes = {d.name for d in self.plan.of("fp16")}
        inits = {i.name: i for i in g.initializer}
        readers: dict[str, int] = {}
        for n in g.node:
            for i in n.input:
                readers[i] = readers.get(i, 0) + 1
        converted: set[str] = set()
        out_nodes: list[onnx.NodeProto] = []
        changed = 0

        def to_fp16(name: str) -> None:
            if name in converted or name not in inits:
                return
            arr = numpy_helper.to_array(inits[name])
            inits[name].CopyFrom(numpy_helper.from_array(arr.astype(np.float16), name))
            converted.add(name)

        for node in g.node:
            if node.name not in fp16_nodes:
                out_nodes.append(node)
                continue
            if node.op_type == "Gather" and readers.get(node.input[0], 0) == 1:
                to_fp16(node.input[0])
                y = node.output[0]
                node.output[0] = f"{y}_fp16"
                out_nodes += [node, helper.make_node("Cast", [node.output[0]], [y], name=f"{node.name}_to_fp32",
                                                     to=TensorProto.FLOAT)]
                changed += 1
            elif node.op_type in FP16_NORM_OPS and all(readers.get(i, 0) == 1 for i in node.input[1:] if i):
                x, y = node.input[0], node.output[0]
                out_nodes.append(helper.make_node("Cast", [x], [f"{node.name}_x_fp16"], name=f"{node.name}_to_fp16",
                                                  to=TensorProto.FLOAT16))
                node.input[0] = f"{node.name}_x_fp16"
                for i in node.input[1:]:
                    to_fp16(i)
                node.output[0] = f"{y}_fp16"
                del node.output[1:]  # Mean/InvStdDev outputs are training-only
                out_nodes += [node, helper.make_node("Cast", [node.output[0]], [y], name=f"{node.name}_to_fp32",
                                                     to=TensorProto.FLOAT)]
                changed += 1
            else:
                out_nodes.append(node)
        if not changed:
            return PassResult(model, False, "nothing planned for fp16")
        del g.node[:]
        g.node.extend(out_nodes)
        return PassResult(model, True, f"{changed} nodes kept in fp16")
