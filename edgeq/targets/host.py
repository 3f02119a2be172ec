"""host: this machine's ONNX Runtime, CPU EP (and onnxruntime-genai for causal LMs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np

    from edgeq.manifest_schema import Manifest

from edgeq.targets.base import SampleRun, static_batches


@dataclass(frozen=True)
class HostTarget:
    name: str = "host"
    runs_on: str = "this machine's ONNX Runtime, CPU EP"
    model_kinds: tuple[str, ...] = ("encoder", "causal-lm")

    def check_available(self, kind: str = "encoder") -> None:
        """The host runs whatever edgeq itself runs on."""

    def check_package(self, folder: Path, manifest: Manifest) -> None:
        """Every package's model.file is portable ONNX (or ORT format) the CPU EP takes."""

    def run_samples(self, folder: Path, manifest: Manifest, feeds: dict[str, np.ndarray]) -> list[SampleRun]:
        import numpy as np

        # The one exception to "as an app loads it": the host reproduces the reference the export computed, and
        # both run QDQ in float (edgeq.runtime.session says why: x86 hosts without VNNI saturate int8 sums).
        from edgeq.manifest import model_path
        from edgeq.runtime import session

        file = manifest.model.file
        sess = session(model_path(folder, manifest))
        hidden = np.concatenate([sess.run(None, f)[0]
                                 for f in static_batches(feeds, manifest.model.batch_size)])
        return [SampleRun(file, hidden, "host")]

    def greedy_tokens(self, folder: Path, prompt_ids: Sequence[int], n: int) -> tuple[list[int], str]:
        from edgeq.llm.greedy import package_greedy  # genai; a package larger than one part in parts

        return package_greedy(folder, prompt_ids, n)
