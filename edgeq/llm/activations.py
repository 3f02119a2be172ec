"""Input statistics of a causal LM's linear layers, for data-aware weight quantization (GPTQ, clip search).

A linear layer is a MatMul ``Y = X @ W`` whose W is a constant 2-D initializer, or the transpose of one (the
optimum export reads a tied lm_head as ``Transpose(embed_tokens.weight)``). For each distinct input X (q/k/v read
the same tensor; so do gate/up) we accumulate, one window at a time:

  * ``xtx = sum X^T X`` (float64 [K, K]): GPTQ's Hessian up to a factor 2/rows that its relative dampening ignores;
  * ``abs_sum = sum |x|`` per input channel (float64 [K]): the AWQ-style activation magnitude.

Memory is bounded by the layer widths, not by the amount of text, and the graph is cut to what the statistics need
(no lm_head logits); SmolLM2-135M's sizes, time and peak memory: see docs/decisions/int4.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.llm.evaluate import window_feeds
from edgeq.progress import QUIET, Progress
from edgeq.runtime import session

# Inputs up to this width keep float64 Hessians, traces and GPTQ's inverse Cholesky (what SmolLM2's +6% budget was
# met with; float32 throughout moved its perplexity from +5.85% to +6.1%); wider ones (a 1B model's down_proj,
# K = 8192, and up) use float32, which halves their memory and time
FLOAT64_MAX_K = 4096


@dataclass(frozen=True)
class LinearLayer:
    """One MatMul with a constant weight. ``W = init`` or, when ``transpose`` names a Transpose node, ``init.T``."""

    node: str
    input: str
    weight: str
    transpose: str | None
    k: int
    n: int
    tied_to: str | None  # the embedding Gather whose table this weight is (shared, or an equal copy), if any


@dataclass
class InputStats:
    k: int
    xtx: np.ndarray = field(repr=False)
    abs_sum: np.ndarray = field(repr=False)
    rows: int = 0

    @classmethod
    def empty(cls, k: int) -> "InputStats":
        return cls(k, np.zeros((k, k), np.float64 if k <= FLOAT64_MAX_K else np.float32), np.zeros(k, np.float64))

    def add(self, x: np.ndarray) -> None:
        # float32 above FLOAT64_MAX_K (sgemm): a 1B model's down_proj Hessian took 16 s per layer in float64, and
        # its 8192 x 8192 accumulator 512 MB; each entry sums a few thousand rows, far from float32's limits
        x = np.ascontiguousarray(x.reshape(-1, self.k), dtype=self.xtx.dtype)
        self.xtx += x.T @ x
        self.abs_sum += np.abs(x).sum(axis=0, dtype=np.float64)
        self.rows += x.shape[0]

    @property
    def hessian(self) -> np.ndarray:
        return self.xtx

    @property
    def mean_abs(self) -> np.ndarray:
        return self.abs_sum / max(self.rows, 1)


@dataclass
class ActivationStats:
    inputs: dict[str, InputStats]  # by activation tensor name
    layer_input: dict[str, str]  # node name -> its activation tensor
    windows: int

    def for_node(self, node: str) -> InputStats:
        return self.inputs[self.layer_input[node]]


def _initializer_shapes(g: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    return {i.name: tuple(i.dims) for i in g.initializer}


def linear_layers(model: onnx.ModelProto) -> list[LinearLayer]:
    """Every MatMul whose weight is a constant 2-D initializer or its [1, 0] transpose, in graph order."""
    g = model.graph
    shapes = _initializer_shapes(g)
    transposes = {n.output[0]: n for n in g.node if n.op_type == "Transpose" and n.input[0] in shapes
                  and len(shapes[n.input[0]]) == 2 and list(_attr(n, "perm", [1, 0])) == [1, 0]}
    gathers = {}  # table initializer -> Gather node
    for n in g.node:
        if n.op_type == "Gather" and n.input[0] in shapes and len(shapes[n.input[0]]) == 2:
            gathers.setdefault(n.input[0], n.name)
    layers = []
    for n in g.node:
        if n.op_type != "MatMul":
            continue
        b = n.input[1]
        if b in shapes and len(shapes[b]) == 2:
            weight, tr = b, None
            k, nn = shapes[b]
        elif b in transposes:
            weight, tr = transposes[b].input[0], transposes[b].name
            nn, k = shapes[weight]
        else:
            continue
        layers.append(LinearLayer(n.name, n.input[0], weight, tr, k, nn, _tied(g, weight, tr, gathers)))
    return layers


def _tied(g: onnx.GraphProto, weight: str, transpose: str | None, gathers: dict[str, str]) -> str | None:
    """The Gather reading this weight's table: the same initializer, or (duplicated tied weights) an equal copy."""
    if weight in gathers:
        return gathers[weight]
    if transpose is not None:
        return None
    inits = {i.name: i for i in g.initializer}
    w = inits[weight]
    for table, gather in gathers.items():
        t = inits[table]
        # an lm_head [H, V] that is exactly the transpose of an embedding table [V, H]; compare only then
        if tuple(t.dims) == tuple(reversed(w.dims)) and t.data_type == w.data_type:
            if np.array_equal(numpy_helper.to_array(t).T, numpy_helper.to_array(w)):
                return gather
    return None


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def prune_to_outputs(model: onnx.ModelProto, outputs: dict[str, int], in_place: bool = False) -> onnx.ModelProto:
    """The model with ``outputs`` (name -> TensorProto element type) as outputs and only the nodes they need.

    ``in_place`` edits ``model`` itself: for a model the caller loaded only for this, it saves a copy of the weights.
    """
    nodes = list(model.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    needed, stack, keep = set(), list(outputs), set()
    while stack:
        t = stack.pop()
        if t in needed:
            continue
        needed.add(t)
        i = producer.get(t)
        if i is not None and i not in keep:
            keep.add(i)
            stack.extend(x for x in nodes[i].input if x)
    out = model
    if not in_place:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    og = out.graph
    for i in reversed(range(len(og.node))):  # delete in place: re-adding would copy every message
        if i not in keep:
            del og.node[i]
    used = {x for n in og.node for x in n.input}
    for i in reversed(range(len(og.initializer))):
        if og.initializer[i].name not in used:
            del og.initializer[i]
    del og.output[:]
    og.output.extend(helper.make_tensor_value_info(t, elem, None) for t, elem in outputs.items())
    return out


def collect_activation_stats(model: onnx.ModelProto | Path | str, windows: np.ndarray,
                             layers: list[LinearLayer] | None = None, progress: Progress = QUIET) -> ActivationStats:
    """Run the model over ``windows`` [n, S] (one full-window forward each, empty KV cache) and accumulate stats."""
    owned = not isinstance(model, onnx.ModelProto)
    if owned:
        model = onnx.load(str(model))
    layers = linear_layers(model) if layers is None else layers
    elem = {i.name: i.data_type for i in model.graph.initializer}
    widths = {layer.input: layer.k for layer in layers}
    tensors = sorted(widths)
    # MatMul's A has B's element type, so the weight's type is the activation's (float when the weight is gone,
    # as in a model already quantized, whose layers the caller takes from the float model)
    types = {layer.input: elem.get(layer.weight, TensorProto.FLOAT) for layer in layers}
    pruned = prune_to_outputs(model, {t: types[t] for t in tensors}, in_place=owned)
    del model
    sess = session(pruned)
    del pruned  # the session holds its own copy of the weights
    stats = {t: InputStats.empty(widths[t]) for t in tensors}
    for w, ids in enumerate(np.asarray(windows), 1):
        values = sess.run(tensors, window_feeds(sess, ids))
        for t, v in zip(tensors, values):
            stats[t].add(v)
        del values
        progress.step("calibration window", w, len(windows))
    return ActivationStats(stats, {layer.node: layer.input for layer in layers}, len(windows))
