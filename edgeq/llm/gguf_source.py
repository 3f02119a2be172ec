"""GGUF sources: a GGUF-only model becomes an ordinary Hugging Face folder through transformers' dequantizer.

transformers reads the GGUF (``from_pretrained(dir, gguf_file=NAME)``, needs the ``gguf`` package) and dequantizes
every tensor to float, so the export that follows is the same as for a safetensors folder. The GGUF's own metadata
is checked first: only decoder-only causal LMs that transformers can load from GGUF are accepted. transformers
reads the GGUF from a folder holding nothing else (a symlink to it): a tokenizer_config.json or code beside the GGUF
is never read, so the GGUF is the whole source, as its hash in the manifest says.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from edgeq.errors import ModelFolderError, UnsupportedModelError, name_list
from edgeq.safe_load import no_stdin

# GGUF general.architecture values that are decoder-only causal LMs transformers loads from GGUF (4.57).
CAUSAL_LM_GGUF_ARCHS = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "stablelm",
                                  "starcoder2", "falcon", "bloom", "gpt2", "nemotron"})


@dataclass(frozen=True)
class GgufInfo:
    path: Path
    architecture: str
    name: str
    file_type: int
    add_bos_token: bool | None = None  # tokenizer.ggml.add_bos_token; transformers 4.57 ignores it
    eos_token_id: int | None = None
    context_length: int | None = None  # <arch>.context_length: what transformers makes max_position_embeddings


def read_gguf_info(path: Path) -> GgufInfo:
    import gguf

    if not path.is_file():
        raise ModelFolderError(f"GGUF file {path} does not exist", f"pass --gguf-file the name of a .gguf file in {path.parent}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the gguf package raises ValueError/struct errors on a non-GGUF file
        raise ModelFolderError(f"{path} is not a readable GGUF file ({exc})", "pass a .gguf file written by llama.cpp") from exc

    def field(key: str, default=""):
        f = reader.fields.get(key)
        if f is None:
            return default
        value = f.parts[f.data[0]]
        return bytes(value).decode() if f.types and f.types[0] == gguf.GGUFValueType.STRING else value.tolist()[0]

    bos, eos = field("tokenizer.ggml.add_bos_token", None), field("tokenizer.ggml.eos_token_id", None)
    arch = field("general.architecture")
    context = field(f"{arch}.context_length", None)
    return GgufInfo(path, arch, field("general.name"), int(field("general.file_type", -1)),
                    None if bos is None else bool(bos), None if eos is None else int(eos),
                    None if context is None else int(context))


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


def materialize_gguf(folder: Path, gguf_name: str, out: Path) -> Path:
    """Dequantize ``folder/gguf_name`` into an FP32 safetensors folder at ``out`` (config, weights, tokenizer)."""
    info = read_gguf_info(Path(folder) / gguf_name)
    if info.architecture not in CAUSAL_LM_GGUF_ARCHS:
        raise UnsupportedModelError(
            f"{info.path} holds a '{info.architecture}' model, not a decoder-only causal LM",
            f"--gguf-file takes causal LMs: {', '.join(sorted(CAUSAL_LM_GGUF_ARCHS))}",
        )
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()  # the GGUF loader's "legacy behaviour" notice is not the user's concern

    alone = out.parent / f"{out.name}-gguf"
    alone.mkdir(parents=True, exist_ok=True)
    (alone / info.path.name).symlink_to(info.path.resolve())
    safe = {"gguf_file": info.path.name, "local_files_only": True, "trust_remote_code": False}
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings(), no_stdin():  # tqdm bars, notices
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(str(alone), **safe)
        model, loading = AutoModelForCausalLM.from_pretrained(str(alone), dtype=torch.float32,
                                                              output_loading_info=True, **safe)
    check_gguf_loading(info.path, loading)
    # The GGUF is the source: follow its own BOS/EOS. SmolLM2's says add_bos_token false and eos <|im_end|>;
    # transformers adds <|im_start|> as BOS (doubled by the chat template, "Paris." became "L'Étoile, la
    # Marsebeau, ...") and names <|im_start|> as EOS.
    if info.add_bos_token is not None and hasattr(tokenizer, "add_bos_token"):
        tokenizer.add_bos_token = info.add_bos_token  # LlamaTokenizerFast rebuilds its post-processor
    if info.eos_token_id is not None:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(info.eos_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out
