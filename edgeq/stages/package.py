"""package: convert to ORT format, copy the tokenizer, write the manifest, zip; all inside a staging folder.

The ORT conversion uses ONNX Runtime's own converter (``convert_onnx_models_to_ort``) in 'Fixed' style for the
profile's target platform, with type reduction so ``required_operators_and_types.config`` can drive an ONNX Runtime
minimal build. Its optimizations are those the CPU EP applies at load (QDQ -> integer kernels), baked in -- including
the fusion of int8 weight-only layers (DQ -> MatMul) into 8-bit MatMulNBits, whose ``accuracy_level`` is a session
option the command-line converter does not expose; the converter's ``_convert`` is called with it instead.
ONNX Runtime lays the file out differently from run to run; ``ort_format.canonical_ort`` rewrites it byte-stable.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgeq.errors import EdgeqError
from edgeq.manifest import checked_manifest, file_entries, write_manifest
from edgeq.staging import die_with_parent
from edgeq.stages.ort_format import OrtFormatError, canonical_ort

MODEL_FILE = "model.ort"
OPS_CONFIG = "required_operators_and_types.config"
# The .ort may exceed its ONNX source a little (8-bit MatMulNBits stores a scale per 32-weight block: +12.5% on
# weight-only layers, +0.5 MB on MiniLM). Much more means an initializer was duplicated: a naive conversion of a
# tied-embedding model was seen to grow 181 MB -> 295 MB (issue 2).
MAX_ORT_GROWTH = 1.10
ORT_FIXED_OVERHEAD = 256 * 1024  # flatbuffer tables, kernel-type info: what a 0.3 MB model gains


@dataclass(frozen=True)
class Package:
    path: Path
    manifest: dict

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE


# Runs in a child Python: convert_onnx_models_to_ort's main() with one more session option. Its _convert is the
# private function main() calls (ONNX Runtime 1.20-1.32); the child fails loudly if that ever changes. The ops config
# is made from the relative name: its header lists the models it was made from, and a staging path there would make
# every package's config differ.
_CONVERT = """
import os, pathlib, sys
from onnxruntime.tools import convert_onnx_models_to_ort as c
from onnxruntime.tools.ort_format_model import create_config_from_models
stage, platform, level = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
entries = {"session.qdqisint8allowed": "1" if platform == "arm" else "0",
           "session.qdq_matmulnbits_accuracy_level": level}
c._convert(stage, stage, "all", c.OptimizationStyle.Fixed, None, False, False, platform, entries)
os.chdir(stage)
create_config_from_models([pathlib.Path("model.ort")], pathlib.Path("required_operators_and_types.config"), True)
"""


def convert_to_ort(onnx_path: Path, dest: Path, target_platform: str, matmulnbits_accuracy_level: int = 0) -> Path:
    """``onnx_path`` -> ``dest/model.ort`` (+ the ops config). ``matmulnbits_accuracy_level``: see
    ``PackageSpec.matmulnbits_accuracy_level`` in edgeq/profiles.py."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{dest.name}.ortconv-", dir=dest.parent))
    try:
        return _convert(onnx_path, stage, dest, target_platform, matmulnbits_accuracy_level)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _convert(onnx_path: Path, stage: Path, dest: Path, target_platform: str, accuracy_level: int) -> Path:
    shutil.copy(onnx_path, stage / "model.onnx")
    cmd = [sys.executable, "-c", _CONVERT, str(stage), target_platform, str(accuracy_level)]
    run = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=die_with_parent)  # dies with edgeq
    if run.returncode != 0 or not (stage / "model.ort").is_file():
        raise EdgeqError(f"ORT-format conversion failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}",
                         "this is an edgeq bug; please report it with the command line")
    onnx_size, ort_size = (stage / "model.onnx").stat().st_size, (stage / "model.ort").stat().st_size
    if ort_size > MAX_ORT_GROWTH * onnx_size + ORT_FIXED_OVERHEAD:
        raise EdgeqError(
            f"ORT-format conversion grew the model from {onnx_size / 1e6:.2f} MB to {ort_size / 1e6:.2f} MB: "
            "a shared or tied weight was stored twice",
            "this is an edgeq bug; please report it with the model's config.json",
        )
    _make_canonical(stage / "model.ort")
    dest.mkdir(parents=True, exist_ok=True)
    shutil.move(stage / "model.ort", dest / MODEL_FILE)
    shutil.move(stage / OPS_CONFIG, dest / OPS_CONFIG)
    return dest / MODEL_FILE


def _make_canonical(path: Path) -> None:
    try:
        data = canonical_ort(path.read_bytes())
    except OrtFormatError as exc:
        raise EdgeqError(f"ORT-format conversion wrote a file edgeq cannot make byte-stable: {exc}",
                         "this is an edgeq bug (a new ONNX Runtime file layout?); please report it with the "
                         "onnxruntime version") from exc
    path.write_bytes(data)


def copy_tokenizer(src: Path, dest: Path, names: tuple[str, ...]) -> list[str]:
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copy(src / name, dest / name)
            copied.append(name)
    return copied


def copy_encoder_tokenizer(src: Path, dest: Path, source_files: tuple[str, ...]) -> list[str]:
    """The source's tokenizer files, plus the fast-tokenizer files optimum writes even for a vocab.txt-only source."""
    return copy_tokenizer(src, dest, tuple(dict.fromkeys(
        source_files + ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"))))


def finish(folder: Path, manifest: dict) -> Package:
    """Record every file's hash and size in the manifest and write it, as the schema has it (checked: a writer
    cannot record what a reader would refuse)."""
    manifest["files"] = file_entries(folder)
    write_manifest(folder, checked_manifest(manifest, folder))
    return Package(folder, manifest)
