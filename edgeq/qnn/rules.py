"""What the QNN HTP backend cannot take, checked on the static-shape graph before any quantization work.

HTP compiles a graph once for fixed shapes and has no control flow: If/Loop/Scan, ops whose output shape depends
on the data (NonZero, Unique, ...) and any tensor whose shape is still symbolic after the inputs were fixed are
refused here with the node that holds them, instead of failing minutes later as "nodes assigned to the CPU EP".
"""

from __future__ import annotations

import onnx

from edgeq.errors import UnsupportedModelError

# op -> why HTP cannot run it
REFUSED_OPS = {
    "If": "control flow: HTP graphs have no branches",
    "Loop": "control flow: HTP graphs have no loops",
    "Scan": "control flow: HTP graphs have no loops",
    "NonZero": "output shape depends on the data",
    "Unique": "output shape depends on the data",
    "NonMaxSuppression": "output shape depends on the data",
    "SequenceConstruct": "sequence types are not tensors",
    "SequenceAt": "sequence types are not tensors",
    "ConcatFromSequence": "sequence types are not tensors",
}


def htp_problems(model: onnx.ModelProto) -> list[str]:
    """Every reason the graph cannot compile for HTP, one line each (empty: it can be tried)."""
    problems = [f"node '{n.name}' is {n.op_type}: {REFUSED_OPS[n.op_type]}" for n in model.graph.node
                if n.op_type in REFUSED_OPS]
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    for vi in list(inferred.graph.output) + list(inferred.graph.value_info):
        t = vi.type.tensor_type
        if not t.HasField("shape"):
            problems.append(f"tensor '{vi.name}' has no inferable shape")
            continue
        dynamic = [d.dim_param or "?" for d in t.shape.dim if not d.HasField("dim_value")]
        if dynamic:
            problems.append(f"tensor '{vi.name}' keeps dynamic dimension(s) {', '.join(dynamic)}")
    return problems


def check_htp_graph(model: onnx.ModelProto, model_name: str) -> None:
    problems = htp_problems(model)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise UnsupportedModelError(f"{model_name} cannot run on the QNN HTP backend: {shown}",
                                    "HTP needs static shapes and no control flow; use a CPU profile such as "
                                    "android-arm64 for this model")
