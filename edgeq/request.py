"""What an export was asked for (``ExportRequest``) and what the input checks made of it (``Inputs``).

Below the pipeline and the recipes so both, and the stages that record provenance, can name them;
``edgeq.pipeline`` re-exports both (the CLI, ``rebuild`` and the tests import them from there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeq.modelsource import ModelSource
from edgeq.profiles import Profile
from edgeq.textdata import TextSet


@dataclass(frozen=True)
class ExportRequest:
    model_dir: Path
    profile: str
    out_dir: Path = Path("build")
    calibration: Path | None = None
    samples: int | None = None  # overrides profile.quantization.calibration_samples
    seq_len: int | None = None  # overrides profile.quantization.calibration_seq_len
    force: bool = False
    gguf_file: str | None = None  # a GGUF in model_dir to dequantize and export (causal LMs)
    allow_pickle: bool = False  # --allow-pickle: pytorch_model.bin weights, loaded with torch.load(weights_only=True)
    settings: tuple[tuple[str, object], ...] = ()  # profile fields set over the file's (--set, --int4-method, ...)
    name: str | None = None  # --name: the package folder and zip name (default <model>-<profile>)


@dataclass(frozen=True)
class Inputs:
    source: ModelSource
    profile: Profile
    calibration: TextSet
    evaluation: TextSet
    dest: Path
