"""KeepFp16: store embedding tables in FP16 and compute normalizations in FP16, as the plan says.

Embedding Gather: the table becomes FP16 and a Cast back to float follows the lookup (Gather is type-agnostic,
so the lookup itself reads half the bytes). A table is converted in place only when every node reading it is planned
FP16: a tied LM head (Transpose of the table -> MatMul) then computes in FP16 from the same single copy (activations
cast in, logits cast out); otherwise the policy keeps the table FP32. LayerNormalization: input cast to FP16, scale/bias read as
FP16, output cast back; ONNX Runtime's CPU EP has an FP16 LayerNormalization kernel, so the graph still runs on the
CPU EP. Norm parameters can be shared (ONNX Runtime's optimizer merges identical initializers: in a freshly
initialised model every LayerNorm and some biases share one ones/zeros tensor), so each gets one FP16 copy and the
FP32 original is dropped when nothing reads it any more.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.passes.base import PassBase, PassResult
from edgeq.policy import PrecisionPlan
from edgeq.precision import Precision

FP16_NORM_OPS = ("LayerNormalization",)


class KeepFp16(PassBase):
    def __init__(self, plan: PrecisionPlan) -> None:
        self.plan = plan

    def call(self, model: onnx.ModelProto) -> PassResult:
        g = model.graph
        fp16_nodes = {d.name for d in self.plan.of(Precision.FP16)}
        inits = {i.name: i for i in g.initializer}
        readers: dict[str, int] = {}
        for n in g.node:
            for i in n.input:
                readers[i] = readers.get(i, 0) + 1
        # Parameters read only by nodes this pass converts become FP16 in place; others get one FP16 copy.
        fp16_readers: dict[str, int] = {}
        for n in g.node:
            if n.name in fp16_nodes:
                for i in n.input[1:] if n.op_type in FP16_NORM_OPS else n.input[:1]:
                    fp16_readers[i] = fp16_readers.get(i, 0) + 1
        copies: dict[str, str] = {}  # fp32 initializer -> its fp16 version
        out_nodes: list[onnx.NodeProto] = []
        changed = 0

        def fp16_copy(name: str) -> str:
            if name not in copies:
                in_place = fp16_readers.get(name) == readers.get(name)
                copies[name] = name if in_place else f"{name}_fp16"
                arr = numpy_helper.to_array(inits[name]).astype(np.float16)
                if in_place:
                    inits[name].CopyFrom(numpy_helper.from_array(arr, name))
                else:
                    g.initializer.append(numpy_helper.from_array(arr, copies[name]))
            return copies[name]

        for node in g.node:
            if node.name not in fp16_nodes:
                out_nodes.append(node)
                continue
            shared_ok = fp16_readers.get(node.input[0]) == readers.get(node.input[0])  # every reader is FP16 too
            if node.op_type == "Gather" and node.input[0] in inits and shared_ok:
                node.input[0] = fp16_copy(node.input[0])
                y = node.output[0]
                node.output[0] = f"{y}_fp16"
                out_nodes += [node, helper.make_node("Cast", [node.output[0]], [y], name=f"{node.name}_to_fp32",
                                                     to=TensorProto.FLOAT)]
                changed += 1
            elif node.op_type == "Transpose" and node.input[0] in inits and shared_ok:
                # tied lm_head: the transpose of the FP16 table stays FP16 for the FP16 MatMul after it
                node.input[0] = fp16_copy(node.input[0])
                out_nodes.append(node)
                changed += 1
            elif node.op_type == "MatMul" and node.input[1] not in inits:
                # tied lm_head MatMul over the FP16 table: FP16 activations in, logits cast back to float
                x, y = node.input[0], node.output[0]
                out_nodes.append(helper.make_node("Cast", [x], [f"{node.name}_x_fp16"], name=f"{node.name}_to_fp16",
                                                  to=TensorProto.FLOAT16))
                node.input[0] = f"{node.name}_x_fp16"
                node.output[0] = f"{y}_fp16"
                out_nodes += [node, helper.make_node("Cast", [node.output[0]], [y], name=f"{node.name}_to_fp32",
                                                     to=TensorProto.FLOAT)]
                changed += 1
            elif node.op_type in FP16_NORM_OPS and all(i in inits for i in node.input[1:] if i):
                x, y = node.input[0], node.output[0]
                out_nodes.append(helper.make_node("Cast", [x], [f"{node.name}_x_fp16"], name=f"{node.name}_to_fp16",
                                                  to=TensorProto.FLOAT16))
                node.input[0] = f"{node.name}_x_fp16"
                for k in range(1, len(node.input)):
                    if node.input[k]:
                        node.input[k] = fp16_copy(node.input[k])
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
