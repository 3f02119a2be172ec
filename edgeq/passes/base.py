"""Pass protocol in the manner of onnx-ir's ``PassBase``/``PassResult``: ``call(model) -> PassResult``.

Passes mutate a copy, never their input, and say whether they changed anything; ``run_passes`` re-raises a failure
as "error in pass X after passes [A, B]" so a broken graph edit names itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import onnx

from edgeq.errors import PassError


@dataclass(frozen=True)
class PassResult:
    model: onnx.ModelProto
    modified: bool
    summary: str = ""


class PassBase:
    """A graph edit. Subclasses implement ``call`` on a model they may mutate (``__call__`` hands them a copy)."""

    def call(self, model: onnx.ModelProto) -> PassResult:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        work = onnx.ModelProto()
        work.CopyFrom(model)
        return self.call(work)

    @property
    def name(self) -> str:
        return type(self).__name__


def run_passes(model: onnx.ModelProto, passes: Sequence[PassBase]) -> tuple[onnx.ModelProto, list[PassResult]]:
    done: list[str] = []
    results = []
    for p in passes:
        try:
            result = p(model)
        except PassError:
            raise
        except Exception as exc:  # a bug in a pass, reported with where it happened
            raise PassError(f"error in pass {p.name} after passes [{', '.join(done)}]: {exc}",
                            "this is an edgeq bug; please report it with the manifest of the failed run") from exc
        model = result.model
        results.append(result)
        done.append(p.name)
    return model, results


def graph_maps(g: onnx.GraphProto) -> tuple[dict[str, onnx.TensorProto], dict[str, onnx.NodeProto],
                                             dict[str, list[onnx.NodeProto]]]:
    """A graph's initializers by name, each tensor's producing node and each tensor's reading nodes (in order)."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    return {i.name: i for i in g.initializer}, {o: n for n in g.node for o in n.output}, readers
