"""SplitWideWeights: a linear layer's 16-bit weight as two 8-bit planes, so HTP before v73 takes it.

Hexagon v68/v69 (and the HTP simulator when an app names no SoC) refuse a FullyConnected or MatMul whose static
weight is 16-bit (QNN validation error 3110); v73 and later take it. A symmetric int16 weight ``q`` (zero point 0,
per tensor) is exactly ``256 * hi + lo`` with ``hi = floor(q / 256)`` in int8 and ``lo`` in [0, 255] as uint8, so
``x @ DQ(q, s) = x @ DQ(hi, 256 s) + x @ DQ(lo, s)``: two 8-bit-weight products and one Add, the 16 bits kept.
Each partial product is quantized with parameters derived from the layer output's (``_partial_qparams``); their sum
is quantized as the original product was. Matches ``DQ(W16) -> MatMul|Gemm -> Q`` with a per-tensor, zero-point-0
int16 weight; anything else is left alone. Its effect on MiniLM's accuracy (cosine 0.998232 -> 0.998228 on the CPU
EP): see docs/decisions/qnn-htp.md.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.passes.base import PassBase, PassResult, graph_maps


class SplitWideWeights(PassBase):
    def call(self, model: onnx.ModelProto) -> PassResult:
        g = model.graph
        inits, producer, consumers = graph_maps(g)
        found = {}  # MatMul/Gemm output -> (the node, its weight's DequantizeLinear, its output's QuantizeLinear)
        for node in g.node:
            if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or _is_transposed(node):
                continue
            dq = producer.get(node.input[1])
            outs = consumers.get(node.output[0], [])
            if (_wide_weight(dq, inits) and len(consumers[dq.input[0]]) == 1 and len(consumers[dq.output[0]]) == 1
                    and len(outs) == 1 and outs[0].op_type == "QuantizeLinear"):
                found[node.output[0]] = (node, dq, outs[0])
        if not found:
            return PassResult(model, False, "no 16-bit weight to split")
        dropped = {dq.output[0] for _n, dq, _q in found.values()}
        nodes = []
        for node in g.node:  # each split in the MatMul's place: its inputs are all defined before it
            if node.output[0] in found:
                nodes += _planes(g, *found[node.output[0]], inits)
            elif node.output[0] not in dropped:
                nodes.append(node)
        for _n, dq, _q in found.values():  # the 16-bit weight, and its scale and zero point if nothing else reads them
            for name in dict.fromkeys(dq.input[:3]):
                if len(consumers[name]) == 1:
                    g.initializer.remove(inits[name])
        del g.node[:]
        g.node.extend(nodes)
        names = ", ".join(n.name for n, _dq, _q in found.values())
        return PassResult(model, True, f"{len(found)} 16-bit weights as two 8-bit planes: {names}")


def _wide_weight(dq: onnx.NodeProto | None, inits: dict) -> bool:
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
        return False
    w, s, z = (inits.get(n) for n in dq.input[:3])
    return (w is not None and s is not None and z is not None and w.data_type == TensorProto.INT16
            and len(w.dims) == 2 and not s.dims and not numpy_helper.to_array(z).any())


def _is_transposed(node: onnx.NodeProto) -> bool:
    return any(a.name in ("transA", "transB") and a.i for a in node.attribute)


def _planes(g: onnx.GraphProto, node: onnx.NodeProto, dq: onnx.NodeProto, q_out: onnx.NodeProto,
            inits: dict) -> list[onnx.NodeProto]:
    """The nodes that replace ``node`` (adds the planes' initializers to ``g``)."""
    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.int32)
    scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
    hi = np.floor_divide(q, 256)
    lo = q - 256 * hi
    base = dq.input[0]
    planes = []
    for tag, data, s in (("hi", hi.astype(np.int8), scale * 256), ("lo", lo.astype(np.uint8), scale)):
        names = [f"{base}_{tag}", f"{base}_{tag}_scale", f"{base}_{tag}_zero_point"]
        g.initializer.extend([numpy_helper.from_array(data, names[0]),
                              numpy_helper.from_array(np.asarray(s, np.float32), names[1]),
                              numpy_helper.from_array(np.zeros((), data.dtype), names[2])])
        planes.append((tag, names))
    added, partials = [], []
    for k, (tag, names) in enumerate(planes):
        w = f"{names[0]}_DequantizeLinear_Output"
        added.append(helper.make_node("DequantizeLinear", names, [w], name=f"{names[0]}_DequantizeLinear"))
        inputs = [node.input[0], w] + (list(node.input[2:]) if k == 0 else [])  # the bias (Gemm's C) once
        y = f"{node.output[0]}_{tag}"
        part = onnx.NodeProto()
        part.CopyFrom(node)
        part.name = f"{node.name}_{tag}"
        del part.input[:], part.output[:]
        part.input.extend(inputs)
        part.output.append(y)
        qy, dy, qp = f"{y}_QuantizeLinear_Output", f"{y}_DequantizeLinear_Output", [f"{y}_scale", f"{y}_zero_point"]
        g.initializer.extend(_partial_qparams(q_out, inits, tag, qp))
        added += [part, helper.make_node("QuantizeLinear", [y, *qp], [qy], name=f"{y}_QuantizeLinear"),
                  helper.make_node("DequantizeLinear", [qy, *qp], [dy], name=f"{y}_DequantizeLinear")]
        partials.append(dy)
    added.append(helper.make_node("Add", partials, [node.output[0]], name=f"{node.name}_planes_Add"))
    return added


def _partial_qparams(q_out: onnx.NodeProto, inits: dict, tag: str, names: list[str]) -> list[onnx.TensorProto]:
    """Quantization of a partial product, from the layer output's: the high plane's product is the output less the
    low plane's (a few % of it), so it takes the output's range doubled around its centre; the low plane's product
    is small and of either sign, so it takes the output's step around zero. Both stay in the output's dtype."""
    scale = float(numpy_helper.to_array(inits[q_out.input[1]]))
    zp = numpy_helper.to_array(inits[q_out.input[2]])
    info = np.iinfo(zp.dtype)
    mid = (int(info.min) + int(info.max) + 1) / 2
    if tag == "hi":  # the real value at the middle step stays there: (mid - zp) * scale = (mid - point) * 2 * scale
        scale, point = 2 * scale, mid - (mid - float(zp)) / 2
    else:
        point = mid
    point = np.asarray(np.clip(np.round(point), info.min, info.max), zp.dtype)
    return [numpy_helper.from_array(np.asarray(scale, np.float32), names[0]), numpy_helper.from_array(point, names[1])]
