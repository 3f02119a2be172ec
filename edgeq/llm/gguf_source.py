"""GGUF sources through transformers: its config and tokenizer conversion (what ``edgeq.decoder.gguf_weights`` writes
a GGUF's folder with), and ``materialize_gguf``, its dequantizer: the whole model as an FP32 folder, which edgeq's
export and eval no longer use (they read a GGUF a tensor at a time) and tests and bench compare them against.

transformers reads the GGUF (``from_pretrained(dir, gguf_file=NAME)``, needs the ``gguf`` package). The GGUF's own
metadata is checked first (``modelsource.inspect_gguf``, from the header alone): only the families
``edgeq.families`` exports from GGUF are accepted, before anything is dequantized. transformers reads the GGUF from
a folder holding nothing else (a symlink to it): a tokenizer_config.json or code beside the GGUF is never read, so
the GGUF is the whole source, as its hash in the manifest says.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

from edgeq.errors import ModelFolderError
from edgeq.modelsource import GgufInfo, gguf_family, name_list, read_gguf_info
from edgeq.safe_load import no_stdin


def check_gguf_loading(path: Path, loading: dict) -> None:
    """transformers fills parameters the GGUF lacks (or holds in another shape) at random and only logs it; once
    saved, such a model looks complete, so what the loader reports is checked here."""
    problems = [f"{len(keys)} {what}: {name_list(keys)}"
                for what, keys in (("missing", sorted(loading.get("missing_keys") or [])),
                                   ("with another shape", [k[0] if isinstance(k, tuple) else k
                                                           for k in loading.get("mismatched_keys") or []]))
                if keys]
    if problems:
        raise ModelFolderError(f"the GGUF {path} does not hold every tensor of its architecture: {'; '.join(problems)}",
                               "re-download or re-convert the GGUF (edgeq never fills missing weights at random)")


@contextlib.contextmanager
def quiet_transformers():
    """transformers' GGUF notices ("legacy behaviour"), tqdm bars and warnings are not the user's concern; nothing
    it runs may read stdin."""
    import transformers

    transformers.logging.set_verbosity_error()
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings(), no_stdin():
        warnings.simplefilter("ignore")
        yield


def alone_folder(info: GgufInfo, where: Path) -> Path:
    """A folder at ``where`` holding only a symlink to the GGUF: transformers reads nothing beside it."""
    where.mkdir(parents=True, exist_ok=True)
    (where / info.path.name).symlink_to(info.path.resolve())
    return where


def gguf_tokenizer(alone: Path, info: GgufInfo):
    """transformers' conversion of the GGUF's tokenizer (metadata only, no tensor read), with the GGUF's BOS/EOS."""
    from transformers import AutoTokenizer

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(alone), **safe_kwargs(info))
    # The GGUF is the source: follow its own BOS/EOS. SmolLM2's says add_bos_token false and eos <|im_end|>;
    # transformers adds <|im_start|> as BOS (doubled by the chat template, "Paris." became "L'Étoile, la
    # Marsebeau, ...") and names <|im_start|> as EOS.
    if info.add_bos_token is not None and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = info.add_bos_token  # LlamaTokenizerFast rebuilds its post-processor
    if info.eos_token_id is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(info.eos_token_id)
    return tokenizer


def safe_kwargs(info: GgufInfo) -> dict:
    return {"gguf_file": info.path.name, "local_files_only": True, "trust_remote_code": False}


def _dequantizing() -> dict:
    """transformers 5 keeps a GGUF's weights in their blocks where a kernel can run them (with the ``kernels``
    package); asked to dequantize, it yields the float32 model 4.x always did. 4.x has no such option."""
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers 4.x
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _drop_gguf_quantizer(model) -> None:
    """transformers 5 marks a model read from a GGUF as quantized (method "gguf") even when every weight is
    dequantized, and then refuses to save it; its weights are plain float32 tensors by now, so the mark goes (the
    saved config must not name the GGUF either). 4.x sets neither."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for holder in (model, model.config):
        if getattr(holder, "quantization_config", None) is not None:
            delattr(holder, "quantization_config")
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def materialize_gguf(folder: Path, gguf_name: str, out: Path) -> Path:
    """Dequantize ``folder/gguf_name`` into an FP32 safetensors folder at ``out`` (config, weights, tokenizer)."""
    info = read_gguf_info(Path(folder) / gguf_name)
    gguf_family(info)  # inspect_model_dir checked it already; never dequantize a family edgeq refuses
    import torch
    from transformers import AutoModelForCausalLM

    alone = alone_folder(info, out.parent / f"{out.name}-gguf")
    tokenizer = gguf_tokenizer(alone, info)
    with quiet_transformers():
        model, loading = AutoModelForCausalLM.from_pretrained(str(alone), dtype=torch.float32,
                                                              output_loading_info=True, **safe_kwargs(info),
                                                              **_dequantizing())
    check_gguf_loading(info.path, loading)
    _drop_gguf_quantizer(model)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
