"""The typed plan every decide function returns: one decision (precision and why) per node, made before any pass."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from edgeq.precision import Precision


@dataclass(frozen=True)
class NodeDecision:
    name: str
    op_type: str
    category: str
    role: str
    precision: Precision
    reason: str
    sensitivity: float | None = None  # what the recipe measured for this node (e.g. mean-cosine drop alone at int8)


@dataclass(frozen=True)
class PrecisionPlan:
    decisions: tuple[NodeDecision, ...]

    def by_name(self) -> dict[str, NodeDecision]:
        return {d.name: d for d in self.decisions}

    def of(self, precision: str) -> list[NodeDecision]:
        return [d for d in self.decisions if d.precision == precision]

    def summary(self) -> dict[str, dict[str, int]]:
        """category -> precision -> node count."""
        out: dict[str, Counter] = {}
        for d in self.decisions:
            out.setdefault(d.category, Counter())[str(d.precision)] += 1
        return {c: dict(v) for c, v in sorted(out.items())}


@dataclass(frozen=True)
class Sensitivity:
    """Per-layer mean-cosine drop against FP32 when only that layer is quantized to static INT8."""

    drops: dict[str, float]
    samples: int

    def ranking(self) -> list[str]:
        return sorted(self.drops, key=lambda n: (-self.drops[n], n))
