"""Partition reports: how ONNX Runtime's mobile usability checker expects an execution provider to split a model.

``onnxruntime.tools.mobile_helpers.usability_checker`` holds, per EP, the table of ops the EP takes
(``nnapi_supported_ops.md``, ``coreml_supported_{neuralnetwork,mlprogram}_ops.md``) and ``check_partitioning``, which
groups the supported nodes into the partitions the EP would be given. Its verdict (YES / MAYBE / NO) is the checker's
own rule: one partition over 75% of the nodes is YES; more than two partitions is NO (the copies between CPU and the
accelerator cost more than it saves). Each EP is checked as the model is (dynamic shapes: the EPs take no node whose
input shape is not fixed) and as if its input shapes were fixed (``make_dynamic_shape_fixed``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgeq.errors import EdgeqError

PARTITION_EPS = ("NNAPI", "CoreML-NeuralNetwork", "CoreML-MLProgram")
SHAPE_CONSTANT_BYTES = 4096  # external tensors up to this size are read for shape inference (shapes, axes, scalars)
_COREML_TABLES = {"CoreML-NeuralNetwork": "coreml_supported_neuralnetwork_ops.md",
                  "CoreML-MLProgram": "coreml_supported_mlprogram_ops.md"}


def _check(ep: str, model, fixed_shapes_required: bool):
    from onnxruntime.tools.mobile_helpers import usability_checker as uc

    if ep == "NNAPI":
        return uc.check_nnapi_partitions(model, fixed_shapes_required)
    return uc.check_coreml_partitions(model, fixed_shapes_required, _COREML_TABLES[ep])


def _summary(info) -> dict:
    return {"nodes": info.num_nodes, "supported_nodes": info.num_supported_nodes, "partitions": info.num_partitions,
            "supported_fraction": round(info.num_supported_nodes / max(info.num_nodes, 1), 4),
            "unsupported_ops": sorted(info.unsupported_ops),
            "nodes_unsupported_due_to_dynamic_shape": info.nodes_unsupported_due_to_dynamic_input,
            "verdict": info.suitability().name}


def partition_report(onnx_path: Path, eps: tuple[str, ...]) -> dict:
    """EP -> {"as_is": summary, "fixed_shapes": summary} for the ONNX model at ``onnx_path`` (shape-inferred first,
    as the checker does). Empty when ``eps`` is."""
    if not eps:
        return {}
    unknown = [e for e in eps if e not in PARTITION_EPS]
    if unknown:
        raise EdgeqError(f"no partition check for {unknown[0]!r}", f"known: {', '.join(PARTITION_EPS)}")
    logging.getLogger("usability_checker").setLevel(logging.WARNING)
    model = _shape_inferred(Path(onnx_path))
    _explicit_transpose_perms(model)
    report = {"tool": "onnxruntime.tools.mobile_helpers.usability_checker.check_partitioning"}
    for ep in eps:
        as_is, fixed = _summary(_check(ep, model, True)), _summary(_check(ep, model, False))
        best = max((as_is, fixed), key=lambda r: ("NO", "MAYBE", "YES").index(r["verdict"]))
        report[ep] = {"verdict": best["verdict"] + (" (with fixed input shapes)" if best is fixed and best is not as_is
                                                    and fixed["verdict"] != as_is["verdict"] else ""),
                      "as_is": as_is, "fixed_shapes": fixed}
    return report


def _shape_inferred(onnx_path: Path):
    """The graph with its shapes inferred, as ORT's ``ModelProtoWithShapeInfo`` gives it, but with only the small
    external tensors read (the constants shape inference folds): a 1B decoder's weights are dims here, not the
    2.6 GB that loading them (and copying them through inference) took at the end of an export."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    model = onnx.load(str(onnx_path), load_external_data=False)
    for tensor in model.graph.initializer:
        length = next((int(e.value) for e in tensor.external_data if e.key == "length"), None)
        if uses_external_data(tensor) and length is not None and length <= SHAPE_CONSTANT_BYTES:
            load_external_data_for_tensor(tensor, str(onnx_path.parent))
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


def _explicit_transpose_perms(model) -> None:
    """Give every Transpose without ``perm`` its default (reversed axes) where the input rank is known: the checker
    reads ``node.attribute[0]`` of every Transpose and raises IndexError on one without attributes (ORT 1.32). Only
    the in-memory copy being checked is changed."""
    from onnx import AttributeProto, helper

    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*model.graph.value_info, *model.graph.input)
             if v.type.tensor_type.HasField("shape")}
    for node in model.graph.node:
        if node.op_type == "Transpose" and not node.attribute:
            rank = ranks.get(node.input[0])  # unknown (after a contrib op): an empty perm skips the rank check
            perm = list(range(rank - 1, -1, -1)) if rank is not None else []
            node.attribute.append(helper.make_attribute("perm", perm, attr_type=AttributeProto.INTS))
