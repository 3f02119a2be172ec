"""Op categories from one data table, so name matching lives here and nowhere else.

A node's category decides its hard precision rule in ``edgeq/policy/`` and groups the ``inspect`` report. Linear
layers are recognised by structure (a MatMul/Gemm whose second input is a constant 2-D weight); their role (q/k/v,
attention output, FFN up/down) comes from the node-name patterns each family's entry in ``edgeq.families`` lists.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

import onnx
from onnx import TensorProto

from edgeq.families import linear_roles

# (role, compiled name regex) over every family's linear-layer patterns (edgeq.families), in role order; the first
# match wins. Node names carry no family, so one table serves every model.
_ROLE_PATTERNS = tuple((role, re.compile(pattern)) for role, pattern, _families in linear_roles())

NORM_OPS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "SkipLayerNormalization",
                      "SkipSimplifiedLayerNormalization"})
LINEAR_OPS = frozenset({"MatMul", "Gemm"})
ATTENTION_OPS = frozenset({"GroupQueryAttention", "MultiHeadAttention", "Attention"})  # ORT's fused contrib ops
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16)

CATEGORIES = ("embedding", "norm", "linear", "attention", "attention_matmul", "attention_mask", "softmax", "other")


@dataclass(frozen=True)
class NodeInfo:
    name: str
    op_type: str
    category: str
    role: str  # linear layers: attn_qkv / attn_out / ffn_up / ffn_down / pooler / linear; else ""
    shared_weight: bool = False  # its constant weight/table is also read by another node (tied weights)


def linear_role(name: str) -> str:
    for role, pattern in _ROLE_PATTERNS:
        if pattern.search(name):
            return role
    return "linear"


def _mask_path(model: onnx.ModelProto) -> set[str]:
    """Nodes fed (transitively) by the attention_mask input, stopping at the Add that meets the scores.

    This path turns the 0/1 mask into a bias of float32-minimum values; any quantized tensor on it loses the
    whole range (issue 2: quantizing it took MiniLM's mean cosine to 0.30).
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    start = [i.name for i in model.graph.input if "mask" in i.name]
    seen: set[str] = set()
    queue = deque(start)
    while queue:
        tensor = queue.popleft()
        for node in consumers.get(tensor, []):
            if node.name in seen:
                continue
            seen.add(node.name)
            if node.op_type in ("Add", "Softmax", "Where") and _feeds_softmax(node, consumers):
                continue  # the Add into Softmax is on the path but nothing beyond it is
            if node.op_type in ATTENTION_OPS:
                continue  # a fused attention takes the mask (as seqlens_k); its outputs are activations
            queue.extend(node.output)
    return seen


def _feeds_softmax(node: onnx.NodeProto, consumers: dict[str, list[onnx.NodeProto]]) -> bool:
    return any(c.op_type == "Softmax" for o in node.output for c in consumers.get(o, []))


def embedding_tables(model: onnx.ModelProto, infos: dict[str, NodeInfo] | None = None) -> set[str]:
    """The initializers read as embedding tables (what KeepFp16 stores at half the bytes); ``infos``: the model's
    ``classify`` result when the caller has it already."""
    by_name = {n.name: n for n in model.graph.node}
    return {by_name[i.name].input[0] for i in (infos or classify(model)).values() if i.category == "embedding"}


def classify(model: onnx.ModelProto) -> dict[str, NodeInfo]:
    """Category of every node, by name. Node names must be unique (export and our passes ensure it)."""
    inits = {i.name: i for i in model.graph.initializer}
    mask_nodes = _mask_path(model)
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for i in node.input:
            readers[i] = readers.get(i, 0) + 1
    # a weight read through Transpose(initializer): how a tied LM head reads the embedding table (edgeq.decoder)
    transposed = {n.output[0]: n.input[0] for n in model.graph.node
                  if n.op_type == "Transpose" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2}
    out: dict[str, NodeInfo] = {}
    for node in model.graph.node:
        op = node.op_type
        role = ""
        if op == "Gather" and node.input[0] in inits and len(inits[node.input[0]].dims) == 2 \
                and inits[node.input[0]].data_type in FLOAT_TYPES:
            cat = "embedding"
        elif op == "GatherBlockQuantized" and node.input[0] in inits:  # an 8-bit table (edgeq.decoder writes it)
            cat = "embedding"
        elif op in NORM_OPS:
            cat = "norm"
        elif op in ATTENTION_OPS:
            cat = "attention"
        elif node.name in mask_nodes:
            cat = "attention_mask"
        elif op in LINEAR_OPS and len(node.input) > 1 and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            cat, role = "linear", linear_role(node.name)
        elif op == "MatMulNBits":  # a linear layer written quantized (edgeq.decoder builds them so)
            cat, role = "linear", linear_role(node.name)
        elif op in LINEAR_OPS and len(node.input) > 1 and node.input[1] in transposed:
            cat, role = "linear", linear_role(node.name)
        elif op in LINEAR_OPS:
            cat = "attention_matmul"
        elif op == "Softmax":
            cat = "softmax"
        else:
            cat = "other"
        weight = node.input[0] if cat == "embedding" else node.input[1] if cat == "linear" else ""
        out[node.name] = NodeInfo(node.name, op, cat, role, readers.get(weight, 0) > 1)
    return out
