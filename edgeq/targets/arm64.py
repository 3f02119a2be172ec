"""arm64: PyPI's aarch64 ONNX Runtime (and onnxruntime-genai) under qemu-user-static; see edgeq.devices.arm64."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import numpy as np

    from edgeq.manifest_schema import Manifest

from edgeq.targets.base import SampleRun, static_batches


@dataclass(frozen=True)
class Arm64Target:
    name: str = "arm64"
    runs_on: str = ("PyPI's aarch64 ONNX Runtime under qemu-user-static, default session options (a 225 MB "
                    "runtime, built on first use)")
    model_kinds: tuple[str, ...] = ("encoder", "causal-lm")

    def check_available(self, kind: str = "encoder") -> None:
        from edgeq.devices.arm64 import ensure_runtime

        runtime = ensure_runtime()
        if kind == "causal-lm":
            from edgeq.devices.arm64_genai import ensure_genai

            ensure_genai(runtime)

    def check_package(self, folder: Path, manifest: Manifest) -> None:
        """model.file is portable ONNX (or ORT format): any package runs on the arm64 CPU EP."""

    def run_samples(self, folder: Path, manifest: Manifest, feeds: dict[str, np.ndarray]) -> list[SampleRun]:
        import numpy as np

        from edgeq.devices.arm64 import ensure_runtime, run_on_arm64
        from edgeq.manifest import model_path

        runtime = ensure_runtime()
        file = manifest.model.file
        model = model_path(folder, manifest)
        results = [run_on_arm64(runtime, model, f)
                   for f in static_batches(feeds, manifest.model.batch_size)]
        info = results[0].info
        where = f"{info['machine']} onnxruntime {info['onnxruntime']} under qemu"
        return [SampleRun(file, np.concatenate([r.outputs[0] for r in results]), where)]

    def greedy_tokens(self, folder: Path, prompt_ids: Sequence[int], n: int) -> tuple[list[int], str]:
        from edgeq.devices.arm64 import ensure_runtime
        from edgeq.devices.arm64_genai import ensure_genai, greedy_tokens_on_arm64

        runtime = ensure_runtime()
        ensure_genai(runtime)
        got, info = greedy_tokens_on_arm64(runtime, folder, prompt_ids, n)
        return got, (f"onnxruntime-genai {info['onnxruntime_genai']} on {info['machine']} onnxruntime "
                     f"{info['onnxruntime']} under qemu")
