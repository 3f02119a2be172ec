"""optimize: provider-independent graph clean-up before quantization.

Only ONNX Runtime's *basic* level runs here (constant folding, redundant-node elimination, shape-op folding): those
rewrites are semantics-preserving and EP-independent, so nothing x86-specific (NCHWc, AVX-only fused ops) enters
the graph. Then the shape arithmetic ORT cannot fold with dynamic dimensions is folded (edgeq/passes/fold_shapes.py:
the same outputs to the bit, ~90 fewer nodes in MiniLM). Fusions the ARM CPU EP supports are applied later by the
ORT-format conversion with ``--target_platform arm``, except attention: its float pattern is gone once the
projections are quantized, so recipes for the CPU EP ask for it here (MultiHeadAttention, which ORT's CPU EP runs on
x86 and ARM alike; edgeq/passes/fuse_attention.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

from edgeq.categories import NodeInfo, classify
from edgeq.passes.base import run_passes
from edgeq.passes.fold_shapes import FoldShapeArithmetic
from edgeq.passes.fuse_attention import FuseEncoderAttention
from edgeq.passes.name_nodes import NameNodes
from edgeq.stages.export import ExportedModel


@dataclass(frozen=True)
class OptimizedModel:
    exported: ExportedModel
    onnx_path: Path
    nodes: dict[str, NodeInfo]
    fusion: str = ""  # what the attention fusion did, when asked for (its PassResult summary)

    def load(self) -> onnx.ModelProto:
        return onnx.load(str(self.onnx_path))


def optimize(exported: ExportedModel, workdir: Path, fuse_attention: bool = False) -> OptimizedModel:
    """``fuse_attention``: each self-attention block as one MultiHeadAttention (edgeq/passes/fuse_attention.py),
    for recipes whose target runs it (the CPU EP on x86 and ARM)."""
    source, fusion = exported.onnx_path, ""
    if fuse_attention:
        fused, (result,) = run_passes(onnx.load(str(source)), [FuseEncoderAttention()])
        fusion = result.summary
        if result.modified:  # unfused, the export itself is what the basic level reads
            source = workdir / "optimized.fused.onnx"  # weights beside it: an encoder may pass protobuf's 2 GB
            onnx.save(fused, str(source), save_as_external_data=True, location=f"{source.name}.data")
    raw = workdir / "optimized.raw.onnx"
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(raw)
    ort.InferenceSession(str(source), so, providers=["CPUExecutionProvider"])
    model, _ = run_passes(onnx.load(str(raw)), [NameNodes(), FoldShapeArithmetic()])
    path = workdir / "optimized.onnx"
    onnx.save(model, str(path))
    raw.unlink()
    if source != exported.onnx_path:
        source.unlink()
        source.with_name(f"{source.name}.data").unlink()
    return OptimizedModel(exported, path, classify(model), fusion)

