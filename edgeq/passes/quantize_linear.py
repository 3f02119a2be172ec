"""QuantizeLinearLayers: rewrite planned linear layers to int8 weights: QDQ form (optional activation QDQ), or an
integer GEMM over activations quantized per token.

For a MatMul ``Y = X @ W`` with W constant [K, N]:
  * W becomes an int8 initializer with one symmetric scale per output channel, read through DequantizeLinear
    (stays int8 on disk and in the .ort file; ONNX Runtime does not constant-fold DQ of an initializer);
  * for ``int8`` (and ``w8a16``) X goes through QuantizeLinear -> DequantizeLinear with the calibrated range,
    which ONNX Runtime's CPU EP fuses with the MatMul into an integer kernel; an ``int8`` input with a smoothing
    (edgeq/stages/smooth.py) is read as X * (1/t), once for all its readers, and each reader's weight row k
    multiplied by t_k before it is quantized;
  * for ``int8-weight-only`` X stays float;
  * for ``int8-per-token`` the MatMul becomes an integer GEMM over X quantized per token at run time
    (edgeq/passes/per_token.py), X quantized once for every layer that reads it.
A weight shared by several nodes is quantized once (tied weights must not be stored twice).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgeq.passes import per_token
from edgeq.passes.base import PassBase, PassResult
from edgeq.policy import PrecisionPlan
from edgeq.precision import Precision

# activation type -> (numpy dtype, qmin, qmax, needs com.microsoft Q/DQ before opset 21)
ACTIVATION_TYPES = {
    "uint8": (np.uint8, 0, 255, False),
    "int8": (np.int8, -128, 127, False),
    "uint16": (np.uint16, 0, 65535, True),
    "int16": (np.int16, -32768, 32767, True),
}
WEIGHT_PRECISIONS = {Precision.INT8, Precision.INT8_WEIGHT_ONLY, Precision.W8A16, Precision.INT8_PER_TOKEN}


@dataclass(frozen=True)
class ActivationRange:
    lo: float
    hi: float


def quantize_weight(w: np.ndarray, axis: int, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 in [-127, 127] (not -128: keeps the grid symmetric, as ARM's s8 kernels assume)."""
    reduce_axis = 1 - axis
    amax = np.abs(w).max(axis=reduce_axis) if per_channel else np.array(np.abs(w).max())
    scale = np.asarray(amax / 127.0, dtype=np.float32)
    scale[scale == 0] = 1.0
    shape = [1, 1]
    shape[axis] = -1
    q = np.clip(np.round(w / (scale.reshape(shape) if per_channel else scale)), -127, 127).astype(np.int8)
    return q, scale


def activation_qparams(r: ActivationRange, act_type: str) -> tuple[np.ndarray, np.ndarray]:
    dtype, qmin, qmax, _ = ACTIVATION_TYPES[act_type]
    lo, hi = min(r.lo, 0.0), max(r.hi, 0.0)
    scale = max((hi - lo) / (qmax - qmin), 1e-12)
    zp = int(np.clip(round(qmin - lo / scale), qmin, qmax))
    return np.array(scale, np.float32), np.array(zp, dtype)


class QuantizeLinearLayers(PassBase):
    def __init__(self, plan: PrecisionPlan, ranges: dict[str, ActivationRange], activation_type: str,
                 per_channel: bool = True,
                 smoothed: dict[str, tuple[np.ndarray, ActivationRange]] | None = None,
                 token_quant: dict[str, per_token.TokenQuant] | None = None) -> None:
        self.plan = plan
        self.ranges = ranges
        self.activation_type = activation_type
        self.per_channel = per_channel
        self.smoothed = smoothed or {}  # input -> (1/t per channel, the range of X * (1/t))
        self.token_quant = token_quant or {}  # per-token inputs' zero point and floor (calibration); else Z = 128

    def call(self, model: onnx.ModelProto) -> PassResult:
        g = model.graph
        decisions = self.plan.by_name()
        inits = {i.name: i for i in g.initializer}
        new_inits: list[onnx.TensorProto] = []
        new_nodes: dict[str, list[onnx.NodeProto]] = {}  # node name -> nodes to insert before it
        weight_cache: dict[tuple[str, int], str] = {}
        act_cache: dict[tuple[str, str], str] = {}
        smoothed_inputs: set[str] = set()  # inputs whose X * (1/t) Mul is written
        dropped: set[str] = set()
        per_token_acts: dict[str, str] = {}  # input -> its quantized codes' base name
        replaced: set[str] = set()  # per-token layers: their nodes replace them
        count = 0
        for node in g.node:
            d = decisions.get(node.name)
            if d is None or d.precision not in WEIGHT_PRECISIONS:
                continue
            before = new_nodes.setdefault(node.name, [])
            w_name = node.input[1]
            axis = 0 if node.op_type == "Gemm" and _attr(node, "transB", 0) else 1
            if d.precision == Precision.INT8_PER_TOKEN:
                new_inits += self._per_token(model, node, inits, axis, before, weight_cache, per_token_acts)
                dropped.add(w_name)
                replaced.add(node.name)
                count += 1
                continue
            smooth = self.smoothed.get(node.input[0]) if d.precision == Precision.INT8 else None
            key = (w_name, axis, node.input[0] if smooth else "")
            if key not in weight_cache:
                w = numpy_helper.to_array(inits[w_name])
                if smooth:  # row k of W [K, N] (column k of a transposed [N, K]) times t_k
                    t = (1 / smooth[0].astype(np.float64))
                    w = (w * (t[:, None] if axis == 1 else t[None, :])).astype(np.float32)
                q, scale = quantize_weight(w, axis, self.per_channel)
                base = f"{w_name}_w8" + (f"_s{len(weight_cache)}" if smooth else "")
                new_inits += [numpy_helper.from_array(q, base), numpy_helper.from_array(scale, base + "_scale"),
                              numpy_helper.from_array(np.zeros(scale.shape, np.int8), base + "_zp")]
                weight_cache[key] = base
                dropped.add(w_name)
            base = weight_cache[key]
            dq_out = f"{node.name}_W_dq"
            dq_kw = {"axis": axis} if self.per_channel else {}
            before.append(helper.make_node("DequantizeLinear", [base, base + "_scale", base + "_zp"], [dq_out],
                                           name=f"{node.name}_W_DequantizeLinear", **dq_kw))
            node.input[1] = dq_out
            if d.precision in (Precision.INT8, Precision.W8A16):
                act_type = self.activation_type if d.precision == Precision.INT8 else _wide(self.activation_type)
                x = node.input[0]
                if smooth:
                    x = self._smoothed_input(x, before, new_inits, smoothed_inputs)
                qkey = (x, act_type)
                if qkey not in act_cache:
                    scale, zp = activation_qparams(smooth[1] if smooth else self.ranges[x], act_type)
                    qb = f"{x}_{act_type}"
                    domain = "com.microsoft" if ACTIVATION_TYPES[act_type][3] else ""
                    new_inits += [numpy_helper.from_array(scale, qb + "_scale"), numpy_helper.from_array(zp, qb + "_zp")]
                    before.append(helper.make_node("QuantizeLinear", [x, qb + "_scale", qb + "_zp"], [qb + "_q"],
                                                   name=f"{qb}_QuantizeLinear", domain=domain))
                    act_cache[qkey] = qb
                qb = act_cache[qkey]
                domain = "com.microsoft" if ACTIVATION_TYPES[act_type][3] else ""
                before.append(helper.make_node("DequantizeLinear", [qb + "_q", qb + "_scale", qb + "_zp"],
                                               [f"{node.name}_X_dq"], name=f"{node.name}_X_DequantizeLinear", domain=domain))
                node.input[0] = f"{node.name}_X_dq"
            count += 1
        if not count:
            return PassResult(model, False, "no linear layer planned for int8")
        ordered = []
        for node in g.node:
            ordered += new_nodes.get(node.name, [])
            if node.name not in replaced:
                ordered.append(node)
        del g.node[:]
        g.node.extend(ordered)
        still_used = {i for n in g.node for i in n.input}
        keep = [i for i in g.initializer if i.name not in dropped or i.name in still_used]
        del g.initializer[:]
        g.initializer.extend(keep + new_inits)
        if per_token_acts:
            g.initializer.extend(per_token.constants())
        contrib = per_token_acts or any(ACTIVATION_TYPES[t][3] for _, t in act_cache)
        if contrib and not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        return PassResult(model, True, f"{count - len(replaced)} linear layers to QDQ, {len(replaced)} per token, "
                                       f"{len(weight_cache)} weights int8")

    def _token_quant(self, x: str) -> per_token.TokenQuant:
        return self.token_quant.get(x, per_token.TokenQuant())

    def _smoothed_input(self, x: str, before: list[onnx.NodeProto], added: list[onnx.TensorProto],
                        done: set[str]) -> str:
        """X * (1/t): the Mul written once, before the first layer that reads it."""
        if x not in done:
            added.append(numpy_helper.from_array(self.smoothed[x][0].astype(np.float32), f"{x}_smooth_inv"))
            before.append(helper.make_node("Mul", [x, f"{x}_smooth_inv"], [f"{x}_smooth"], name=f"{x}_smooth_Mul"))
            done.add(x)
        return f"{x}_smooth"

    def _per_token(self, model: onnx.ModelProto, node: onnx.NodeProto, inits: dict, axis: int,
                   before: list[onnx.NodeProto], weight_cache: dict, acts: dict) -> list[onnx.TensorProto]:
        """``node`` rewritten per token (its nodes appended to ``before``); returns the new initializers. A Gemm's
        alpha goes into the weight scale, its beta * C into a bias Add. The input is read unsmoothed even when its
        static readers are smoothed: smoothing strong enough for a static range (alpha 0.9-1) costs the weights
        more than a per-token range gains (MiniLM, all 36 layers per token: held-back min cosine 0.99435 smoothed,
        0.99766 not)."""
        added: list[onnx.TensorProto] = []
        w_name, x = node.input[1], node.input[0]
        w = numpy_helper.to_array(inits[w_name])
        w = w.T if axis == 0 else w
        alpha = float(_attr(node, "alpha", 1.0)) if node.op_type == "Gemm" else 1.0
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            raise ValueError(f"{node.name}: Gemm with transA is not rewritten per token")
        factor = alpha * per_token.output_factor(self._token_quant(x))
        key = (w_name, axis, "per-token", factor)
        if key not in weight_cache:
            q, scale = quantize_weight(w, 1, self.per_channel)
            base = f"{w_name}_pt" + ("" if not any(k[0] == w_name for k in weight_cache) else f"{len(weight_cache)}")
            added += per_token.weight_initializers(q, scale * np.float32(factor), base)
            weight_cache[key] = base
        if x not in acts:  # q/k/v read one input: quantized once
            acts[x] = f"{x}_pt"
            nodes, consts = per_token.activation_nodes(x, self._token_quant(x), acts[x], _opset(model))
            before += nodes
            added += consts
        bias = node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]
        out = f"{node.name}_nobias" if bias else node.output[0]
        before += per_token.linear_nodes(acts[x], weight_cache[key], out, node.name, self._token_quant(x).per_row)
        if bias:
            beta = float(_attr(node, "beta", 1.0))
            c = node.input[2]
            if beta != 1.0:
                added.append(numpy_helper.from_array(np.float32(beta), f"{node.name}_beta"))
                before.append(helper.make_node("Mul", [c, f"{node.name}_beta"], [f"{node.name}_bc"],
                                               name=f"{node.name}_beta_Mul"))
                c = f"{node.name}_bc"
            before.append(helper.make_node("Add", [out, c], [node.output[0]], name=f"{node.name}_bias_Add"))
        return added


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def _wide(act_type: str) -> str:
    return {"uint8": "uint16", "int8": "int16"}.get(act_type, act_type)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default
