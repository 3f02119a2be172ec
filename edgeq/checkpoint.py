"""The checkpoint's tensors against its architecture, before anything is exported.

transformers fills a parameter missing from the files with random values and only logs it (which edgeq silences);
the FP32 reference is then the same random model, so the accuracy gate passes. Here every parameter the
architecture has must come from the files with its shape, nothing unknown may be in them, and every value must be
finite. Pickle weights (allowed by --allow-pickle) are first converted with torch.load(weights_only=True) into a
safetensors staging folder, so these checks and the exporter read the same plain tensors.
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

from edgeq.errors import ModelFolderError
from edgeq.families import CAUSAL_LM
from edgeq.modelsource import (PICKLE_SUFFIXES, SAFE_WEIGHTS, ModelSource, check_safetensors, name_list,
                               select_weights)
from edgeq.progress import QUIET, Progress
from edgeq.safe_load import no_stdin


def _origin(source: ModelSource) -> str:
    return f"the GGUF {source.gguf_file} (dequantized)" if source.gguf_file else str(source.path)


def checkpoint_shapes(source: ModelSource) -> dict[str, list[int]]:
    """Tensor name -> shape, from the safetensors headers only (no tensor data read)."""
    shapes: dict[str, list[int]] = {}
    for name in source.weight_files:
        if name.endswith(".safetensors"):
            shapes.update({k: list(t["shape"]) for k, t in check_safetensors(source.path / name).items()})
    return shapes


def _skeleton(source: ModelSource):
    """The architecture built from config.json on the meta device: names and shapes, no memory, no init."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if source.kind == CAUSAL_LM else AutoModel  # the class the checkpoint was saved from
    try:
        with no_stdin():
            config = AutoConfig.from_pretrained(str(source.path), local_files_only=True, trust_remote_code=False)
            with torch.device("meta"):
                return auto.from_config(config, trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModelFolderError(f"cannot build {source.architecture or source.model_type} from {source.path}/config.json: "
                               f"{exc}", "restore the config.json the model came with") from exc


def check_complete(source: ModelSource, origin: str = "") -> None:
    """Missing, unexpected or differently shaped tensors -> ModelFolderError naming the first few and the count.
    ``origin`` names the source in errors. Causal LMs are compared by name as edgeq.decoder reads them
    (``_decoder_problems``), encoders as transformers 4.57 loads them (``_encoder_problems``)."""
    origin = origin or _origin(source)
    shapes = checkpoint_shapes(source)
    model = _skeleton(source)
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    problems = (_decoder_problems(model, shapes, expected) if source.kind == CAUSAL_LM
                else _encoder_problems(model, shapes, expected, origin))
    if problems:
        raise ModelFolderError(
            f"the weights in {origin} do not match its config ({source.architecture or source.model_type}, "
            f"{len(expected)} tensors): {'; '.join(problems)}",
            "the weights belong to another model, or the files are incomplete: re-download the folder or re-save it "
            "with save_pretrained (edgeq never fills missing weights at random)")


def _listed(missing: list[str], unexpected: list[str], mismatched: list[str]) -> list[str]:
    return [f"{len(items)} {what}: {name_list(items)}" for what, items in (
        ("missing", missing), ("unexpected", unexpected), ("with another shape", mismatched)) if items]


def _ignored(patterns) -> re.Pattern | None:
    return re.compile("|".join(f"({p})" for p in patterns)) if patterns else None


def _decoder_problems(model, shapes: dict[str, list[int]], expected: dict[str, list[int]]) -> list[str]:
    """edgeq.decoder reads the checkpoint's tensors by their Hugging Face names, so they are compared as named:
    every parameter of the architecture (built from config.json on the meta device) present with its shape, and
    nothing else. What transformers also lets pass is let pass: a tied head's copy (``lm_head.weight`` beside the
    embeddings), buffers (old checkpoints' per-layer ``rotary_emb.inv_freq`` too) and the class's own ignore
    patterns. Only public model attributes are read, the same in transformers 4.57 and 5.x (whose loader
    internals differ); a checkpoint named without the ``model.`` prefix, which 4.57's loader would rename, is
    refused here rather than by the builder minutes later."""
    params = {name for name, _ in model.named_parameters()}  # a tied alias is listed once, under its owner
    buffers = {name for name, _ in model.named_buffers()}
    skip_missing = _ignored(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
    skip_unexpected = _ignored([*(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []),
                                r"rotary_emb\.inv_freq"])
    missing = sorted(k for k in params if k not in shapes and not (skip_missing and skip_missing.search(k)))
    unexpected = sorted(k for k in shapes if k not in expected and k not in buffers and not skip_unexpected.search(k))
    mismatched = [f"{k} {shapes[k]} (the config wants {expected[k]})" for k in sorted(shapes)
                  if k in expected and shapes[k] != expected[k]]
    return _listed(missing, unexpected, mismatched)


def _encoder_problems(model, shapes: dict[str, list[int]], expected: dict[str, list[int]], origin: str) -> list[str]:
    """The comparison is transformers' own (4.57 ``_load_pretrained_model``): its key renaming (legacy LayerNorm
    gamma/beta, the base_model_prefix added or stripped: "bert.x" vs "x"), tied parameters present once, buffers
    optional (persistent ones keep their constructor values, non-persistent ones such as position_ids are never
    loaded), and the model's own ignore patterns. A task checkpoint's head (keys outside the prefix) counts as
    unexpected, as transformers reports it. Encoders are exported by optimum-onnx, which needs transformers < 4.58
    (the ``encoders`` extra), so these 4.57 internals are there whenever this runs."""
    from transformers.modeling_utils import _find_missing_and_unexpected_keys

    keys = list(shapes)
    prefix = model.base_model_prefix
    has_prefix = bool(prefix) and any(k.startswith(prefix) for k in keys)
    expects_prefix = bool(prefix) and hasattr(model, prefix)
    base_from_task, task_from_base = has_prefix and not expects_prefix, expects_prefix and not has_prefix
    try:
        mapping = model._get_key_renaming_mapping(keys, getattr(model, "_checkpoint_conversion_mapping", None) or None,
                                                  base_from_task, task_from_base)
    except ValueError as exc:  # a task model's head keys without the base prefix
        raise ModelFolderError(f"{origin}: {exc}", "re-download or re-save the weights") from exc
    missing, unexpected = _find_missing_and_unexpected_keys(model, keys, list(mapping.values()), base_from_task, None)
    missing, unexpected = model._adjust_missing_and_unexpected_keys(missing, unexpected, task_from_base)
    buffers = {n for n, _ in model.named_buffers()}
    missing = [k for k in missing if k not in buffers]
    mismatched = [f"{new} {shapes[old]} (the config wants {expected[new]})" for old, new in mapping.items()
                  if new in expected and shapes[old] != expected[new]]
    return _listed(missing, unexpected, mismatched)


def check_finite(source: ModelSource, origin: str = "") -> None:
    """NaN/Inf in any floating-point tensor -> ModelFolderError naming the tensors.

    One tensor at a time through safetensors' memory map: memory stays at the largest tensor (SmolLM2-135M's
    embedding table, 113 MB in FP32). Measured on the bundled MiniLM (90 MB): 0.19 s of CPU on one thread, against
    the minutes of the export that follows; it scales with the bytes, so about 1 s for SmolLM2's 540 MB."""
    import torch
    from safetensors import safe_open

    bad: list[str] = []
    for name in source.weight_files:
        if not name.endswith(".safetensors"):
            continue
        with safe_open(str(source.path / name), framework="pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad.append(key)
    if bad:
        raise _non_finite(bad, origin or _origin(source))


def check_finite_tensors(tensors, origin: str, progress: Progress = QUIET) -> None:
    """The same check over a tensor source read one tensor at a time (``edgeq.decoder``'s ``TensorSource``: a GGUF,
    dequantized one tensor at a time, so memory stays at the largest tensor). Counted: a GGUF of a 1B model takes
    minutes to dequantize on 2 cores."""
    import numpy as np

    keys = list(tensors.keys())
    bad = []
    for i, key in enumerate(keys, 1):
        if not np.isfinite(tensors.get(key)).all():
            bad.append(key)
        progress.step("dequantized tensor", i, len(keys))
    if bad:
        raise _non_finite(bad, origin)


def _non_finite(bad: list[str], origin: str) -> ModelFolderError:
    return ModelFolderError(f"the weights in {origin} hold NaN or Inf values in {len(bad)} "
                            f"tensor{'s' if len(bad) > 1 else ''}: {name_list(bad)}",
                            "the checkpoint is damaged (a diverged training run or a broken conversion): "
                            "re-download it or use another checkpoint")


def _pickle_reason(exc: Exception) -> str:
    """The line of torch's error that says what was refused (its message goes on to suggest weights_only=False)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    why = next((ln for ln in lines if ln.startswith("WeightsUnpickler error:")), lines[0] if lines else type(exc).__name__)
    return why.removeprefix("WeightsUnpickler error: ")


def stage_pickle_weights(source: ModelSource, work: Path) -> ModelSource:
    """A copy of the folder (symlinks) whose weights are the pickle files converted to one model.safetensors.

    torch.load(weights_only=True) unpickles tensors and plain containers only: a pickle that names any other
    callable is refused by torch before it runs. Tensors sharing storage (tied weights) are cloned, as safetensors
    stores each once."""
    import torch
    from safetensors.torch import save_file

    out = work / "pickle-source"
    out.mkdir(parents=True)
    for entry in source.path.iterdir():
        if entry.is_file() and entry.name not in source.weight_files and entry.suffix not in (".safetensors",
                                                                                              *PICKLE_SUFFIXES):
            os.symlink(entry.resolve(), out / entry.name)
    state: dict[str, torch.Tensor] = {}
    for name in source.weight_files:
        if name.endswith(".json"):
            continue  # the index: its shards follow
        try:
            part = torch.load(source.path / name, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError or EOFError; none is a bug here
            raise ModelFolderError(f"{source.path / name} is not a plain tensor checkpoint: torch.load(weights_only=True) "
                                   f"refused it ({_pickle_reason(exc)})",
                                   "edgeq unpickles nothing but tensors: re-save the weights where they were made, "
                                   "with save_pretrained(dir, safe_serialization=True)") from exc
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise ModelFolderError(f"{source.path / name} does not hold a state dict (name -> tensor)",
                                   "pass a folder saved with save_pretrained")
        state.update(part)
    seen: set[int] = set()
    for key, tensor in state.items():
        ptr = tensor.untyped_storage().data_ptr()
        state[key] = tensor.contiguous().clone() if ptr in seen else tensor.contiguous()
        seen.add(ptr)
    save_file(state, str(out / SAFE_WEIGHTS), metadata={"format": "pt"})
    return replace(source, path=out, weight_files=(SAFE_WEIGHTS,))


def checked_weights(source: ModelSource, work: Path) -> ModelSource:
    """The source to read: pickles staged as safetensors, then complete and finite, or refused (a GGUF's tensors
    are checked by its reader and ``check_finite_tensors``)."""
    origin = _origin(source)  # the user's folder, not the staging copy
    if source.weight_format == "pickle":
        source = stage_pickle_weights(source, work)
    elif source.weight_format == "gguf":
        source = replace(source, weight_files=select_weights(source.path, source.kind)[0])
    check_complete(source, origin)
    check_finite(source, origin)
    return source

