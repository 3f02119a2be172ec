"""FoldShapeArithmetic: fold the shape arithmetic an exporter leaves in a graph with dynamic batch and length.

Why: a transformers export computes, in every attention layer, the head split and merge targets (Shape, Gather,
Unsqueeze, Concat) and the softmax scale from the head size (Shape, Slice, Cast, Sqrt, Div) at run time. MiniLM has
~90 such nodes, and at batch 1 a sentence's run is dominated by per-node overhead, not arithmetic: each node costs
about as much as a small GEMM. ONNX Runtime's constant folding cannot fold them, because a Shape of a tensor with a
dynamic dimension is not constant, although the values read from it often are (the head size) or are a dimension
copied through (batch and length into a Reshape target).

How: every tensor computed from Shape outputs and constants alone is evaluated (ONNX Runtime) with the graph's
dynamic dimensions set to two different sets of sizes. A tensor with the same value in both is a constant: it
becomes an initializer and the nodes that only fed it go. A Reshape target that differs is rewritten when each of
its entries is either the same in both runs or the data input's own dimension at that index in both: those become
0 ("copy the input's dimension", the Reshape default), so the target is constant. Values are read, never guessed,
and the pass checks the rewritten graph against the original on a third set of sizes before it returns it.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from edgeq.passes.base import PassBase, PassResult

SIZES = ((3, 7), (2, 11), (1, 13))  # (batch-like, length-like) dims of two probing runs and the final check
NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial"}


def _feeds(model: onnx.ModelProto, sizes: tuple[int, int]) -> dict[str, np.ndarray]:
    """Zeros for every graph input, each dynamic dimension given a size by its name (same name, same size): the
    first name seen gets ``sizes[0]``, the others ``sizes[1]``."""
    inits = {i.name for i in model.graph.initializer}
    named: dict[str, int] = {}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        shape = []
        for d in t.shape.dim:
            if d.HasField("dim_value"):
                shape.append(d.dim_value)
            else:
                key = d.dim_param or f"?{inp.name}{len(shape)}"
                named.setdefault(key, sizes[0] if not named else sizes[1])
                shape.append(named[key])
        feeds[inp.name] = np.zeros(shape, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
    return feeds


def _run(model: onnx.ModelProto, outputs: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(o) for o in outputs)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip(outputs, sess.run(outputs, feeds)))


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _shape_derived(model: onnx.ModelProto) -> list[str]:
    """Outputs of Shape nodes and of nodes whose inputs are all constants or such outputs, at least one of the
    latter (graph order is topological; nodes of constants alone are ONNX Runtime's constant folding)."""
    const = {i.name for i in model.graph.initializer}
    seen: dict[str, None] = {}
    for node in model.graph.node:
        ins = [i for i in node.input if i]
        if node.op_type == "Constant":
            const.update(node.output)
        elif node.op_type == "Shape" or (node.op_type not in NONDETERMINISTIC and not _has_subgraph(node)
                                         and any(i in seen for i in ins)
                                         and all(i in const or i in seen for i in ins)):
            seen.update((o, None) for o in node.output if o)
    return list(seen)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))


class FoldShapeArithmetic(PassBase):
    def call(self, model: onnx.ModelProto) -> PassResult:
        g = model.graph
        derived = _shape_derived(model)
        if not derived:
            return PassResult(model, False, "no shape arithmetic")
        reshapes = [n for n in g.node if n.op_type == "Reshape" and n.input[1] in derived
                    and not any(a.name == "allowzero" and a.i for a in n.attribute)]
        wanted = derived + [n.input[0] for n in reshapes if n.input[0] not in derived]
        runs = [_run(model, wanted, _feeds(model, sizes)) for sizes in SIZES[:2]]
        folded = {t: runs[0][t] for t in derived if _same(runs[0][t], runs[1][t])}
        targets = {}
        for n in reshapes:
            if n.input[1] in folded:
                continue
            new = _copied_dims(*(r[n.input[1]] for r in runs), *(r[n.input[0]].shape for r in runs))
            if new is not None:
                targets[n.output[0]] = new  # keyed by output: node names may be empty
        if not folded and not targets:
            return PassResult(model, False, "no shape value is constant")
        before = len(g.node)
        out = _rewrite(model, folded, targets)
        _check(model, out)
        return PassResult(out, True, f"{len(folded)} shape values folded, {len(targets)} Reshape targets made "
                                     f"constant, {before - len(out.graph.node)} nodes removed")


def _copied_dims(t0: np.ndarray, t1: np.ndarray, s0: tuple, s1: tuple) -> np.ndarray | None:
    """A Reshape target equal in both runs entry by entry, or the data's own dimension there (written 0)."""
    if t0.shape != t1.shape or t0.ndim != 1:
        return None
    new = []
    for i, (a, b) in enumerate(zip(t0.tolist(), t1.tolist())):
        if a == b and a != 0:
            new.append(a)
        elif i < len(s0) and a == s0[i] and b == s1[i]:
            new.append(0)
        else:
            return None
    return np.array(new, np.int64)


def _rewrite(model: onnx.ModelProto, folded: dict[str, np.ndarray], targets: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    for n in g.node:
        if n.op_type == "Reshape" and n.output[0] in targets:
            name = f"{n.output[0]}_target"
            g.initializer.append(numpy_helper.from_array(targets[n.output[0]], name))
            n.input[1] = name
    outputs = {o.name for o in g.output}
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in folded.items()
                         if any(k in n.input for n in g.node) or k in outputs)
    # drop every node whose outputs are folded or no longer read, last to first
    needed = set(outputs)
    keep = []
    for n in reversed(g.node):
        if any(o in needed and o not in folded for o in n.output):
            keep.append(n)
            needed.update(i for i in n.input if i)
    del g.node[:]
    g.node.extend(reversed(keep))
    used = needed | outputs
    inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(inits)
    return out


def _check(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """Both graphs on a third set of sizes (inputs 0.. as ints, small floats): the same outputs to the bit."""
    feeds = _feeds(before, SIZES[2])
    rng = np.random.default_rng(0)
    for k, v in feeds.items():
        values = rng.integers(0, 2, v.shape) if v.dtype.kind in "iub" else rng.standard_normal(v.shape)
        feeds[k] = values.astype(v.dtype)
    names = [o.name for o in before.graph.output]
    a, b = _run(before, names, feeds), _run(after, names, feeds)
    bad = [k for k in names if not _same(a[k], b[k])]
    if bad:
        raise ValueError(f"folding the shape arithmetic changed {bad}")
