"""The source model folder: what it holds, what kind of model it is, and the hashes that identify it.

Only local folders, only safetensors weights (a pickle ``.bin`` can execute code when loaded), never
``trust_remote_code``: a folder whose config names custom code is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from edgeq.errors import ModelFolderError, UnsupportedModelError

# model_type -> kind. Encoders export as optimum's "feature-extraction" task (last_hidden_state output); causal LMs
# as "text-generation-with-past" (one decoder whose past_key_values inputs also serve prefill with an empty past).
ENCODER_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "albert", "camembert", "deberta-v2", "nomic_bert"}
)
CAUSAL_LM_TYPES = frozenset({"llama", "qwen2", "phi3", "gemma", "mistral", "smollm3"})
# Causal LM families refused with the reason (tests/llm/test_families.py measured each one).
REFUSED_CAUSAL_LM = {
    "gemma2": ("optimum's Gemma-2 export drops the attention logit soft-capping (config attn_logit_softcapping; "
               "measured: no Tanh before the attention softmax of the exported graph, as transformers' SDPA attention "
               "ignores it), so the package would differ from the model wherever a score nears the cap",
               "Gemma-2 needs an export with eager attention and soft-capping in GroupQueryAttention (softcap, "
               "local_window_size), which edgeq does not do yet; use a Gemma, Llama, Qwen2, Phi-3 or Mistral model"),
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "merges.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model", "tokenizer.model")


@dataclass(frozen=True)
class ModelSource:
    """A validated model folder."""

    path: Path
    name: str
    model_type: str
    architecture: str
    kind: str  # "encoder" | "causal-lm"
    task: str  # optimum task name
    weight_files: tuple[str, ...]
    tokenizer_files: tuple[str, ...]
    file_hashes: dict[str, str]  # relative path -> sha256 of config, weights and tokenizer files
    pooling: str  # encoders: "mean" or "cls" (sentence-transformers' pooling config); causal LMs: ""
    gguf_file: str = ""  # set when the weights come from a GGUF file that export dequantizes first


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_safetensors(path: Path) -> None:
    """The header must parse: 8 little-endian bytes of header length, then that much JSON. A clone made without
    git-lfs leaves a small text pointer in place of the weights."""
    with open(path, "rb") as f:
        head = f.read(8)
        if head.startswith(b"version "):
            raise ModelFolderError(f"{path} is a git-lfs pointer, not the weights",
                                   "fetch the real file: run 'git lfs pull' in the model's repository")
        size = int.from_bytes(head, "little") if len(head) == 8 else -1
        total = path.stat().st_size
        ok = 0 < size <= total - 8
        if ok:
            try:
                header = json.loads(f.read(size))
            except (json.JSONDecodeError, UnicodeDecodeError):
                header = None
            ok = isinstance(header, dict)
    if ok:  # the tensors must fill the file exactly: a download cut after the header fails here, not in the exporter
        ends = [t["data_offsets"][1] for k, t in header.items()
                if k != "__metadata__" and isinstance(t, dict) and "data_offsets" in t]
        if max(ends, default=0) != total - 8 - size:
            raise ModelFolderError(f"{path} is truncated or padded: its header describes {max(ends, default=0)} bytes "
                                   f"of tensors, the file holds {total - 8 - size}",
                                   "re-download the weights; the file is incomplete")
    if not ok:
        raise ModelFolderError(f"{path} is not a valid safetensors file (its header does not parse)",
                               "re-download or re-save the weights: model.save_pretrained(dir, safe_serialization=True)")


_POOLING_KEYS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
                 "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens", "weightedmean": "pooling_mode_weightedmean_tokens",
                 "lasttoken": "pooling_mode_lasttoken"}


def _pooling(path: Path) -> str:
    """sentence-transformers' pooling mode from 1_Pooling/config.json; mean when the folder has none."""
    cfg_path = path / "1_Pooling" / "config.json"
    if not cfg_path.is_file():
        return "mean"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{cfg_path} is not valid JSON: {exc}", "restore the sentence-transformers pooling config") from exc
    modes = [m for m, key in _POOLING_KEYS.items() if isinstance(cfg, dict) and cfg.get(key)]
    if modes not in (["mean"], ["cls"]):
        raise UnsupportedModelError(f"{cfg_path}: pooling {'+'.join(modes) or '(none set)'} is not supported",
                                    "edgeq measures and verifies mean- or CLS-pooled embeddings")
    return modes[0]


def _folder_name(path: Path) -> str:
    resolved = path.resolve()
    return resolved.name if resolved.name != "model" else resolved.parent.name


def inspect_gguf(path: Path, gguf_file: str) -> ModelSource:
    """A GGUF causal LM: checked from its own metadata; export dequantizes it through transformers."""
    from edgeq.llm.gguf_source import CAUSAL_LM_GGUF_ARCHS, read_gguf_info

    info = read_gguf_info(path / gguf_file)
    if info.architecture not in CAUSAL_LM_GGUF_ARCHS:
        raise UnsupportedModelError(f"{info.path} holds a '{info.architecture}' model, not a decoder-only causal LM",
                                    f"--gguf-file takes causal LMs: {', '.join(sorted(CAUSAL_LM_GGUF_ARCHS))}")
    return ModelSource(
        path=path.resolve(), name=Path(gguf_file).stem, model_type=info.architecture, architecture=info.architecture,
        kind="causal-lm", task="text-generation-with-past", weight_files=(gguf_file,), tokenizer_files=(),
        file_hashes={gguf_file: sha256_file(path / gguf_file)}, pooling="", gguf_file=gguf_file,
    )


def inspect_model_dir(path: Path, gguf_file: str | None = None) -> ModelSource:
    path = Path(path)
    if not path.exists():
        raise ModelFolderError(f"model folder {path} does not exist", "pass the folder that holds config.json and the weights")
    if not path.is_dir():
        raise ModelFolderError(f"{path} is not a folder", "pass the model's folder, not a file inside it")
    if gguf_file:
        return inspect_gguf(path, gguf_file)
    config_path = path / "config.json"
    if not config_path.is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        raise ModelFolderError(f"{path} has no config.json",
                               f"it holds {', '.join(ggufs)}: pass --gguf-file {ggufs[0]}" if ggufs else
                               "a Hugging Face model folder holds config.json beside its weights")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{config_path} is not valid JSON: {exc}", "restore the config.json the model came with") from exc
    if not isinstance(config, dict):
        raise ModelFolderError(f"{config_path} does not hold a JSON object", "restore the config.json the model came with")
    weights = sorted(p.name for p in path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = "expected model.safetensors (or sharded model-0000x-of-0000y.safetensors)"
        if pickles:
            hint += (f"; found {', '.join(pickles)}: edgeq does not load pickle weights (they can run code). Convert "
                     "them once with transformers: AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
        raise ModelFolderError(f"{path} holds no safetensors weights", hint)
    if config.get("auto_map"):
        raise UnsupportedModelError(
            f"{path} needs custom code (config.json has 'auto_map'); edgeq never runs trust_remote_code",
            "use a model whose architecture ships with transformers",
        )
    model_type = config.get("model_type", "")
    archs = config.get("architectures") or []
    arch = archs[0] if archs else ""
    if model_type in REFUSED_CAUSAL_LM:
        reason, hint = REFUSED_CAUSAL_LM[model_type]
        raise UnsupportedModelError(f"{path} is a {model_type} causal LM, which edgeq refuses: {reason}", hint)
    kind = "causal-lm" if model_type in CAUSAL_LM_TYPES and (not arch or arch.endswith("ForCausalLM")) else "encoder"
    if kind == "encoder" and (model_type in CAUSAL_LM_TYPES or arch.endswith("ForCausalLM")):
        raise UnsupportedModelError(
            f"{path} is a causal LM ({arch or model_type}) of a family edgeq does not export yet",
            f"causal LM model types supported: {', '.join(sorted(CAUSAL_LM_TYPES))}",
        )
    if kind == "encoder" and model_type not in ENCODER_TYPES:
        raise UnsupportedModelError(
            f"architecture '{model_type or '(no model_type)'}' ({arch or 'no architectures'}) is not supported",
            f"supported encoder model types: {', '.join(sorted(ENCODER_TYPES))}",
        )
    if kind == "encoder" and arch and not arch.endswith("Model"):
        raise UnsupportedModelError(
            f"{path} is a {arch} (a task head); edgeq exports sentence encoders (the base *Model) for embeddings",
            "export the base encoder (architectures: ['BertModel'] or similar) whose last_hidden_state is pooled",
        )
    tokenizer_files = tuple(n for n in TOKENIZER_FILES if (path / n).is_file())
    if not tokenizer_files:
        raise ModelFolderError(f"{path} has no tokenizer files", f"expected tokenizer.json (or one of {', '.join(TOKENIZER_FILES)})")
    for name in weights:  # after the architecture checks: a wrong model type is the more useful error
        check_safetensors(path / name)
    pooling = _pooling(path) if kind == "encoder" else ""
    hashed = ["config.json", *weights, *tokenizer_files]
    if (path / "1_Pooling" / "config.json").is_file():
        hashed.append("1_Pooling/config.json")
    return ModelSource(
        path=path.resolve(),
        name=_folder_name(path),
        model_type=model_type,
        architecture=arch,
        kind=kind,
        task="feature-extraction" if kind == "encoder" else "text-generation-with-past",
        weight_files=tuple(weights),
        tokenizer_files=tokenizer_files,
        file_hashes={n: sha256_file(path / n) for n in hashed},
        pooling=pooling,
    )
