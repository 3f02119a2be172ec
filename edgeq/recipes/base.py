"""The one protocol every recipe implements, and what a build hands back to the pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edgeq.errors import EdgeqError
from edgeq.progress import Progress
from edgeq.request import ExportRequest, Inputs


@dataclass(frozen=True)
class Built:
    """A package written (unverified, manifest without its file list) into the staging folder.

    ``over_budget`` holds the budget checks that failed, in the order they are reported: the pipeline writes the
    manifest, then raises the first one, so an over-budget package is never placed."""
    manifest: dict
    over_budget: tuple[EdgeqError, ...] = ()


class Recipe(Protocol):
    """One way from checked inputs to a package, for one (model kind, target kind)."""

    name: str

    def build(self, inputs: Inputs, req: ExportRequest, folder: Path, work: Path, progress: Progress) -> Built:
        """Write the package into ``folder`` (scratch files into ``work``); both are inside the staging folder."""
        ...


def failed(*checks: EdgeqError | None) -> tuple[EdgeqError, ...]:
    """The budget errors among ``checks`` (each None when its check passed), in order."""
    return tuple(c for c in checks if c is not None)
