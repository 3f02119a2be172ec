"""What a device target is: the ``Target`` protocol every registered target implements, and what it returns.

A target runs a package the way an app on that device loads it: ONNX Runtime with its default session options
(graph optimizations on), plus only what the device itself needs (an execution provider and its options). Checks
that are about the machine (a runtime that cannot be built, a wheel that is missing) raise DeviceUnavailableError
with a hint; a package the target cannot run at all is a UserInputError; a model that fails to load or run is a
finding, which ``edgeq verify`` reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:  # numpy stays out of the CLI's start-up: the registry builds --on's choices
    import numpy as np

    from edgeq.manifest_schema import Manifest


@dataclass(frozen=True)
class SampleRun:
    """One model file of a package run on a target over the manifest's stored sample rows."""

    model: str  # the package file that ran
    hidden: np.ndarray  # its first output, one row per stored sample, in order
    where: str  # what ran it, in words (runtime, version, placement)


class Target(Protocol):
    name: str  # what --on takes
    runs_on: str  # what runs the model, in a few words (the --on help and `edgeq targets`)
    model_kinds: tuple[str, ...]  # manifest source kinds it runs: "encoder", "causal-lm"

    def check_available(self, kind: str = "encoder") -> None:
        """Raise DeviceUnavailableError (with the fix in its hint) when this machine cannot run the target's
        runtime for packages of ``kind``."""

    def check_package(self, folder: Path, manifest: Manifest) -> None:
        """Raise UserInputError when the package was not built for this target (before any file is checked)."""

    def run_samples(self, folder: Path, manifest: Manifest, feeds: dict[str, np.ndarray]) -> list[SampleRun]:
        """Run every model file an app of this target may load over ``feeds`` (the stored rows)."""

    def greedy_tokens(self, folder: Path, prompt_ids: Sequence[int], n: int) -> tuple[list[int], str]:
        """A causal LM package's greedy continuation of ``prompt_ids`` (``n`` tokens at most) and where it ran."""


@dataclass(frozen=True)
class InputShape:
    """The token inputs a package's encoder takes: ``batch`` rows of exactly ``seq_len`` tokens for a static-shape
    model (its manifest records model.batch_size and model.seq_len), else any batch, padded to its longest text."""

    seq_len: int
    batch: int | None = None

    @property
    def padding(self) -> bool | str:
        return "max_length" if self.batch else True


def input_shape(manifest: Manifest) -> InputShape:
    m = manifest.model
    if m.batch_size:
        return InputShape(int(m.seq_len), m.batch_size)
    return InputShape(manifest.profile.values.accuracy.eval_seq_len)


def static_batches(feeds: dict[str, np.ndarray], batch: int | None) -> list[dict[str, np.ndarray]]:
    """The stored rows as the model takes them: all at once, or ``batch`` rows at a time for a static-shape model
    (its manifest records model.batch_size; the stored rows are padded to whole batches)."""
    rows = len(next(iter(feeds.values())))
    step = batch or rows
    return [{k: a[i:i + step] for k, a in feeds.items()} for i in range(0, rows, step)]
