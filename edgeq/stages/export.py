"""export: a validated model folder -> an FP32 ONNX model through optimum-onnx's exporter."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
from safetensors import SafetensorError

from edgeq.checkpoint import checked_weights
from edgeq.errors import ModelFolderError, UnsupportedModelError
from edgeq.modelsource import ModelSource
from edgeq.safe_load import no_stdin


@dataclass(frozen=True)
class ExportedModel:
    """FP32 ONNX export of the source, with the tokenizer files optimum saved beside it."""

    source: ModelSource  # what was exported: pickle weights staged as safetensors in the workdir
    onnx_path: Path
    tokenizer_dir: Path
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


def export(source: ModelSource, workdir: Path) -> ExportedModel:
    """Check the weights (complete, finite; pickles staged through weights_only), then export them."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach for a hub
    source = checked_weights(source, workdir)
    from optimum.exporters.onnx import main_export

    out = workdir / "export"
    log = io.StringIO()
    for name in ("transformers", "optimum"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        # The exporter's tracer warnings and prints are about its internals, not the user's model.
        with contextlib.redirect_stdout(log), warnings.catch_warnings(), no_stdin():
            warnings.simplefilter("ignore")
            main_export(
                str(source.path), str(out), task=source.task, local_files_only=True, trust_remote_code=False,
                library_name="transformers", do_validation=False,
            )
    except (KeyError, ValueError, NotImplementedError) as exc:
        raise UnsupportedModelError(f"optimum-onnx cannot export {source.path} as {source.task}: {exc}",
                                    "check the model type is supported by optimum-onnx for this task") from exc
    except (OSError, SafetensorError) as exc:  # unreadable or damaged weights/tokenizer files
        raise ModelFolderError(f"cannot read the model in {source.path}: {exc}",
                               "check the folder's files are complete (re-download or re-save them)") from exc
    path = out / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    return ExportedModel(
        source=source, onnx_path=path, tokenizer_dir=out,
        input_names=tuple(i.name for i in model.graph.input), output_names=tuple(o.name for o in model.graph.output),
    )
