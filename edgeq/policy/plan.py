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
    sensitivity: float | None = None  # what the recipe measured for this node (e.g. output error a promotion cuts)


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
    """Per-layer gain of a promotion to the profile's sensitive precision: the layer's output error at static INT8
    minus at that precision (edgeq/stages/layer_errors.py); the largest gain ranks first. ``samples``: the
    calibration texts whose tokens were sampled."""

    gains: dict[str, float]
    samples: int

    def ranking(self) -> list[str]:
        return sorted(self.gains, key=lambda n: (-self.gains[n], n))
