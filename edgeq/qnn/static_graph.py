"""The static-shape FP32 graph the QNN quantizer starts from.

Order: fix the input shapes (FixStaticShapes) and replace the mask path's float32-minimum bias (ClampMaskBias);
let ONNX Runtime's basic level fold what the fixed shapes made constant (on MiniLM the 17-node Shape/Gather/Concat/
Equal/Where mask-shape subgraph disappears); refuse what HTP cannot take (``rules``); then ONNX Runtime's
``qnn_preprocess_model`` fuses Erf-GELU into Gelu and ReduceMean sequences into LayerNormalization, ops HTP runs as one.
After quantization, ``portable_qdq`` writes the package's model.onnx with each 16-bit weight as two 8-bit planes
(SplitWideWeights), so the QNN EP compiles it for any Hexagon generation, not only the profile's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import onnx
import onnxruntime as ort

from edgeq.passes.base import PassResult, run_passes
from edgeq.passes.clamp_mask_bias import ClampMaskBias
from edgeq.passes.fix_static_shapes import FixStaticShapes
from edgeq.passes.name_nodes import NameNodes
from edgeq.passes.split_wide_weights import SplitWideWeights
from edgeq.profiles import QNNSpec
from edgeq.qnn.rules import check_htp_graph


@dataclass(frozen=True)
class StaticGraph:
    onnx_path: Path
    passes: dict[str, PassResult]  # pass name -> its result, in the order they ran
    preprocessed: bool  # qnn_preprocess_model fused something

    @property
    def mask_bias_changed(self) -> bool:
        return self.passes["ClampMaskBias"].modified


def static_graph(model: onnx.ModelProto, spec: QNNSpec, workdir: Path, model_name: str) -> StaticGraph:
    from onnxruntime.quantization.execution_providers.qnn import qnn_preprocess_model

    edits = [FixStaticShapes(spec.batch_size, spec.seq_len), ClampMaskBias(spec.mask_bias)]
    fixed, results = run_passes(model, edits)
    raw, folded = workdir / "static.raw.onnx", workdir / "static.folded.onnx"
    onnx.save(fixed, str(raw))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(folded)
    ort.InferenceSession(str(raw), so, providers=["CPUExecutionProvider"])
    check_htp_graph(onnx.load(str(folded)), model_name)
    pre = workdir / "static.pre.onnx"
    fused = qnn_preprocess_model(str(folded), str(pre), fuse_layernorm=True)
    naming = [NameNodes()]
    named, more = run_passes(onnx.load(str(pre if fused else folded)), naming)
    out = workdir / "static.onnx"
    onnx.save(named, str(out))
    return StaticGraph(out, {p.name: r for p, r in zip(edits + naming, results + more)}, bool(fused))


def portable_qdq(qdq_path: Path, out: Path, static: StaticGraph) -> StaticGraph:
    """Write ``out`` (the package's model.onnx) from the quantized ``qdq_path`` with SplitWideWeights applied; the
    returned StaticGraph records that pass after the static ones (the manifest lists them as qnn.graph_passes)."""
    model, results = run_passes(onnx.load(str(qdq_path)), [SplitWideWeights()])
    onnx.save(model, str(out))
    return replace(static, passes={**static.passes, "SplitWideWeights": results[0]})
