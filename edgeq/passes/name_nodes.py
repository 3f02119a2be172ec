"""NameNodes: give every node a unique, non-empty name (plans and manifests refer to nodes by name)."""

from __future__ import annotations

import onnx

from edgeq.passes.base import PassBase, PassResult


class NameNodes(PassBase):
    def call(self, model: onnx.ModelProto) -> PassResult:
        explicit = {n.name for n in model.graph.node if n.name}
        seen: set[str] = set()
        changed = 0
        for i, node in enumerate(model.graph.node):
            name = node.name or f"{node.op_type}_{i}"
            while name in seen or (name != node.name and name in explicit):
                name = f"{name}_{i}"
            if name != node.name:
                node.name = name
                changed += 1
            seen.add(name)
        return PassResult(model, bool(changed), f"{changed} nodes renamed")
