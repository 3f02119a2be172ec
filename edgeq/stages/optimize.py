"""optimize: provider-independent graph clean-up before quantization.

Only ONNX Runtime's *basic* level runs here (constant folding, redundant-node elimination, shape-op folding): those
rewrites are semantics-preserving and EP-independent, so nothing x86-specific (NCHWc, AVX-only fused ops) enters
the graph. Then the shape arithmetic ORT cannot fold with dynamic dimensions is folded (edgeq/passes/fold_shapes.py:
the same outputs to the bit, ~90 fewer nodes in MiniLM). Fusions the ARM CPU EP supports are applied later by the
ORT-format conversion with ``--target_platform arm``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

from edgeq.categories import NodeInfo, classify
from edgeq.passes.base import run_passes
from edgeq.passes.fold_shapes import FoldShapeArithmetic
from edgeq.passes.name_nodes import NameNodes
from edgeq.stages.export import ExportedModel


@dataclass(frozen=True)
class OptimizedModel:
    exported: ExportedModel
    onnx_path: Path
    nodes: dict[str, NodeInfo]

    def load(self) -> onnx.ModelProto:
        return onnx.load(str(self.onnx_path))


def optimize(exported: ExportedModel, workdir: Path) -> OptimizedModel:
    raw = workdir / "optimized.raw.onnx"
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(raw)
    ort.InferenceSession(str(exported.onnx_path), so, providers=["CPUExecutionProvider"])
    model, _ = run_passes(onnx.load(str(raw)), [NameNodes(), FoldShapeArithmetic()])
    path = workdir / "optimized.onnx"
    onnx.save(model, str(path))
    raw.unlink()
    return OptimizedModel(exported, path, classify(model))

