"""qnn-htp: ONNX Runtime's QNN execution provider on Qualcomm's HTP backend (on x86_64, the Hexagon simulator).

An app on a Snapdragon phone loads either file of an android-qnn-htp package: ``model_ctx.onnx`` (the context binary
precompiled for the profile's SoC) or the portable QDQ ``model.onnx`` (compiled by the QNN EP at load, for any SoC).
This target opens both with ONNX Runtime's default session options, the QNN EP added, and CPU fallback disabled, so
a run proves every node of each is on HTP. The SoC is the one the manifest records; the profile's is the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np

    from edgeq.manifest_schema import Manifest

from edgeq.errors import UserInputError
from edgeq.profiles import QNNSpec
from edgeq.targets.base import SampleRun, static_batches


@dataclass(frozen=True)
class QnnHtpTarget:
    name: str = "qnn-htp"
    runs_on: str = ("android-qnn-htp packages: model.onnx and model_ctx.onnx on the QNN HTP simulator, default "
                    "session options, CPU fallback disabled; needs edgeq[qnn]")
    model_kinds: tuple[str, ...] = ("encoder",)
    soc_model: int = QNNSpec().soc_model  # used when a manifest records none: the profile's SoC
    htp_arch: int = QNNSpec().htp_arch

    def check_available(self, kind: str = "encoder") -> None:
        from edgeq.devices.qnn_htp import qnn_module

        qnn_module()

    def check_package(self, folder: Path, manifest: Manifest) -> None:
        if not manifest.is_qnn or manifest.model.context_file is None:
            raise UserInputError(f"{folder} has no EPContext model: it was not built for the QNN EP",
                                 "verify it --on host or --on arm64, or re-export it with --profile android-qnn-htp")

    def soc(self, manifest: Manifest) -> tuple[int, int]:
        """(soc_model, htp_arch) the package was compiled for (the schema has checked both are integers)."""
        qnn = manifest.qnn
        return (self.soc_model, self.htp_arch) if qnn is None else (qnn.soc_model, qnn.htp_arch)

    def run_samples(self, folder: Path, manifest: Manifest, feeds: dict[str, np.ndarray]) -> list[SampleRun]:
        """The context model first (what the package was compiled into), then the portable model."""
        import numpy as np

        from edgeq.devices.qnn_htp import check_embedded_context, run_htp
        from edgeq.manifest import model_path, package_path

        m = manifest.model
        soc, arch = self.soc(manifest)
        ctx = package_path(folder, m.context_file, "the manifest's model.context_file")
        check_embedded_context(ctx)
        chunks = static_batches(feeds, m.batch_size)
        runs = []
        for file, path in ((m.context_file, ctx), (m.file, model_path(folder, manifest))):
            run = run_htp(path, chunks, soc, arch)
            where = (f"QNN HTP simulator (v{arch}, soc_model {soc}), {run.placement.htp_fraction:.0%} of nodes on HTP, "
                     f"{np.mean(run.run_seconds):.2f} s per run")
            runs.append(SampleRun(file, np.concatenate(run.outputs), where))
        return runs

    def greedy_tokens(self, folder: Path, prompt_ids: Sequence[int], n: int) -> tuple[list[int], str]:
        raise UserInputError(f"{folder} is a causal LM package; the qnn-htp target runs encoder packages only",
                             "verify it --on host or --on arm64")
