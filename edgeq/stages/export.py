"""export: a validated model folder -> an FP32 ONNX model through optimum-onnx's exporter (encoders only).

optimum-onnx is the ``encoders`` extra, not a core dependency: its latest release (0.1.0) supports transformers
< 4.58 only, and causal LMs never reach this module (edgeq.decoder builds them). So it is imported here alone, when
an encoder is exported, and ``require_optimum`` (called by the pipeline's input checks too) turns its absence into
an error naming the extra before any work.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
from safetensors import SafetensorError

from edgeq.checkpoint import checked_weights
from edgeq.errors import MissingExtraError, ModelFolderError, UnsupportedModelError
from edgeq.modelsource import ModelSource
from edgeq.progress import QUIET, Progress
from edgeq.safe_load import no_stdin


@dataclass(frozen=True)
class ExportedModel:
    """FP32 ONNX export of the source, with the tokenizer files optimum saved beside it."""

    source: ModelSource  # what was exported: pickle weights staged as safetensors in the workdir
    onnx_path: Path
    tokenizer_dir: Path
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


ENCODERS_EXTRA = "pip install 'edgeq[encoders]'"


def require_optimum(what: str = "an encoder", load: bool = True):
    """optimum-onnx's ``main_export``; MissingExtraError naming the extra when it does not import (not installed, or
    an optimum built for another transformers). ``load=False`` (the input checks) only finds the module: importing
    it takes 5-12 s, which an export that is refused for another reason (its OUT busy) should not spend first."""
    try:
        if not load:
            if importlib.util.find_spec("optimum.exporters.onnx") is None:
                raise ModuleNotFoundError("No module named 'optimum.exporters.onnx'")
            return None
        from optimum.exporters.onnx import main_export
    except ImportError as exc:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = f"this environment has transformers {version('transformers')}"
        except PackageNotFoundError:
            installed = "transformers is not installed"
        raise MissingExtraError(
            f"exporting {what} needs optimum-onnx, edgeq's 'encoders' extra, and it does not import ({exc})",
            f"{ENCODERS_EXTRA}: optimum-onnx 0.1.0 needs transformers < 4.58 ({installed}; pip downgrades a "
            "newer one, so keep encoders in their own environment if other code needs transformers 5). Causal "
            "LMs export without it") from exc
    return main_export


@contextlib.contextmanager
def counted_layers(progress: Progress) -> Iterator[None]:
    """A step per layer as the exporter's forward pass (torch's tracer) goes through the model's largest ModuleList
    (BERT's encoder.layer), through torch's global module hooks: main_export loads the model itself. They return
    None, so the traced graph is the one without them. What follows the trace (ONNX conversion, saving) has no
    counter; the CLI's heartbeat covers it."""
    import torch

    layers: dict[int, int] = {}

    def before(module, args) -> None:
        if not layers:  # the first module run whose tree holds a ModuleList: the model (or its tracing wrapper)
            lists = [m for m in module.modules() if isinstance(m, torch.nn.ModuleList)]
            layers.update({id(m): i for i, m in enumerate(max(lists, key=len, default=()), 1)})

    def after(module, args, output) -> None:
        if id(module) in layers:
            progress.step("traced layer", layers[id(module)], len(layers))

    hooks = (torch.nn.modules.module.register_module_forward_pre_hook(before),
             torch.nn.modules.module.register_module_forward_hook(after))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def export(source: ModelSource, workdir: Path, progress: Progress = QUIET) -> ExportedModel:
    """Check the weights (complete, finite; pickles staged through weights_only), then export them."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach for a hub
    main_export = require_optimum(f"{source.model_type} models")
    source = checked_weights(source, workdir)

    out = workdir / "export"
    log = io.StringIO()
    for name in ("transformers", "optimum"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        # The exporter's tracer warnings and prints are about its internals, not the user's model.
        with contextlib.redirect_stdout(log), warnings.catch_warnings(), no_stdin(), counted_layers(progress):
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
