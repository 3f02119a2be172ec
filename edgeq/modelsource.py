"""The source model folder: what it holds, what kind of model it is, and the hashes that identify it.

Only local folders, only safetensors weights (a pickle ``.bin`` can execute code when loaded) unless pickles are
explicitly allowed, never ``trust_remote_code``: a folder holding Python or a config naming custom code is refused.
The weight files recorded and hashed are exactly the ones transformers' loader reads. Which families are exported,
and which are refused with what reason, is ``edgeq.families``' table; a GGUF is checked from its header alone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeq.errors import ModelFolderError, UnsupportedModelError
from edgeq.families import CAUSAL_LM, ENCODER, Family, by_gguf_arch, by_model_type, supported_gguf_archs, \
    supported_model_types
from edgeq.safe_load import refuse_code

if TYPE_CHECKING:
    from edgeq.manifest_schema import SourceRecord

# What transformers loads, in its order of preference (modeling_utils: SAFE_WEIGHTS_NAME and its index first).
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_WEIGHTS, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

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
    weight_format: str = "safetensors"  # "safetensors" | "pickle" (allowed by --allow-pickle) | "gguf"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_safetensors(path: Path) -> dict[str, dict]:
    """The header must parse: 8 little-endian bytes of header length, then that much JSON. A clone made without
    git-lfs leaves a small text pointer in place of the weights. Returns the tensors' entries (dtype, shape,
    data_offsets) by name; a file with none (a decoy) is refused."""
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
    if not ok:
        raise ModelFolderError(f"{path} is not a valid safetensors file (its header does not parse)",
                               "re-download or re-save the weights: model.save_pretrained(dir, safe_serialization=True)")
    tensors = {k: t for k, t in header.items() if k != "__metadata__"}
    if not all(isinstance(t, dict) and "data_offsets" in t and "shape" in t for t in tensors.values()):
        raise ModelFolderError(f"{path} is not a valid safetensors file (a tensor entry lacks its shape or offsets)",
                               "re-download or re-save the weights: model.save_pretrained(dir, safe_serialization=True)")
    # the tensors must fill the file exactly: a download cut after the header fails here, not in the exporter
    end = max((t["data_offsets"][1] for t in tensors.values()), default=0)
    if end != total - 8 - size:
        raise ModelFolderError(f"{path} is truncated or padded: its header describes {end} bytes "
                               f"of tensors, the file holds {total - 8 - size}",
                               "re-download the weights; the file is incomplete")
    if not tensors:
        raise ModelFolderError(f"{path} holds no tensors", "re-download or re-save the weights: "
                               "model.save_pretrained(dir, safe_serialization=True)")
    return tensors


def _index_shards(path: Path, index_name: str) -> list[str]:
    """The shard files a transformers index (``weight_map``: tensor -> file) names, each a plain file in ``path``."""
    index = path / index_name
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ModelFolderError(f"{index} is not a valid weights index ({exc})", "re-download the index and its shards") from exc
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelFolderError(f"{index} has no weight_map", "re-download the index and its shards")
    shards = sorted(set(map(str, weight_map.values())))
    for name in shards:
        if Path(name).name != name or not (path / name).is_file():
            raise ModelFolderError(f"{index} names the shard {name!r}, which is not a file beside it",
                                   "re-download the index and all its shards")
    return shards


def _pickle_files(path: Path) -> list[str]:
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                  if p.suffix.lower() in PICKLE_SUFFIXES and p.is_file())


def name_list(names: list[str], shown: int = 5) -> str:
    """The first ``shown`` names and how many more: errors name a few, with the count."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _convert_hint(path: Path, kind: str, pickles: list[str]) -> str:
    auto = "AutoModelForCausalLM" if kind == "causal-lm" else "AutoModel"
    return (f"convert them once to {SAFE_WEIGHTS} (transformers loads them with torch.load(weights_only=True)): python -c "
            f"\"from transformers import {auto} as M; M.from_pretrained('{path}').save_pretrained('{path}', "
            f"safe_serialization=True)\" then delete {name_list(pickles)}, or pass --allow-pickle if you trust them")


def select_weights(path: Path, kind: str, allow_pickle: bool = False) -> tuple[tuple[str, ...], str]:
    """(the weight files transformers' loader will read, "safetensors" | "pickle"), chosen by name (headers are
    checked by check_safetensors); everything else is refused.

    Safetensors follow transformers' names: model.safetensors, or model.safetensors.index.json with its shards (the
    index is recorded too). Other *.safetensors files (model.fp16.safetensors, adapters, decoys) are never read by
    the loader, so they are ignored and not hashed. Any pickle file (loading one can run code) is refused unless
    ``allow_pickle``; then pytorch_model.bin (or its index and shards) is used only where no safetensors are."""
    pickles = _pickle_files(path)
    if pickles and not allow_pickle:
        safe = (path / SAFE_WEIGHTS).is_file() or (path / SAFE_INDEX).is_file()
        raise ModelFolderError(
            f"{path} holds {'pickle files' if safe else 'no safetensors weights, only pickle files'} "
            f"({name_list(pickles)}); edgeq does not load pickle weights "
            "(unpickling can run code)", _convert_hint(path, kind, pickles))
    if (path / SAFE_INDEX).is_file():
        return (SAFE_INDEX, *_index_shards(path, SAFE_INDEX)), "safetensors"
    if (path / SAFE_WEIGHTS).is_file():
        return (SAFE_WEIGHTS,), "safetensors"
    if (path / PICKLE_INDEX).is_file():
        return (PICKLE_INDEX, *_index_shards(path, PICKLE_INDEX)), "pickle"
    if (path / PICKLE_WEIGHTS).is_file():
        return (PICKLE_WEIGHTS,), "pickle"
    others = sorted(p.name for p in path.glob("*.safetensors"))
    found = f"; found {', '.join(others + pickles)}, which transformers does not load" if others or pickles else ""
    raise ModelFolderError(f"{path} holds no safetensors weights under transformers' names",
                           f"expected {SAFE_WEIGHTS} (or {SAFE_INDEX} with its shards){found}")


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
    """The GGUF's header and metadata (the ``gguf`` reader maps the file; no tensor is read or dequantized)."""
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


def refuse_family(family: Family, what: str) -> None:
    """A family the registry refuses stops here, with its reason, before any work."""
    if family.refusal is not None:
        kind = "causal LM" if family.kind == CAUSAL_LM else family.kind
        raise UnsupportedModelError(f"{what} is a {family.name} {kind}, which edgeq refuses: "
                                    f"{family.refusal.reason}", family.refusal.hint)


def gguf_family(info: GgufInfo) -> Family:
    """The family of a GGUF's ``general.architecture``: one edgeq exports from GGUF, else refused."""
    family = by_gguf_arch(info.architecture)
    if family is None:
        raise UnsupportedModelError(f"{info.path} holds a '{info.architecture}' model, which is not a causal LM "
                                    "family edgeq exports from GGUF",
                                    f"--gguf-file takes the GGUF architectures {', '.join(supported_gguf_archs())}")
    refuse_family(family, f"{info.path} (GGUF architecture '{info.architecture}')")
    return family


def inspect_gguf(path: Path, gguf_file: str) -> ModelSource:
    """A GGUF causal LM: checked from its own metadata, the family first (before hashing the file); the recipe
    reads config, tokenizer and tensors from this file alone (edgeq.decoder.gguf_weights), so nothing else beside it
    is read: it is the one file hashed."""
    info = read_gguf_info(path / gguf_file)
    family = gguf_family(info)
    return ModelSource(
        path=path.resolve(), name=Path(gguf_file).stem, model_type=info.architecture, architecture=info.architecture,
        kind=family.kind, task=family.task, weight_files=(gguf_file,), tokenizer_files=(),
        file_hashes={gguf_file: sha256_file(path / gguf_file)}, pooling="", gguf_file=gguf_file, weight_format="gguf",
    )


def config_family(path: Path, model_type: str, arch: str) -> Family:
    """The family of a config.json's model_type and architectures[0], refused with the reason where it is not
    one edgeq exports (in that kind: a *ForCausalLM of an encoder family, a task head of an encoder)."""
    family = by_model_type(model_type)
    if family is not None:
        refuse_family(family, f"{path} (model_type {model_type})")
    causal_arch = arch.endswith("ForCausalLM")
    if causal_arch and (family is None or family.kind != CAUSAL_LM):
        raise UnsupportedModelError(f"{path} is a causal LM ({arch}) of a family edgeq does not export yet",
                                    f"causal LM model types supported: {', '.join(supported_model_types(CAUSAL_LM))}")
    if family is None:
        raise UnsupportedModelError(
            f"architecture '{model_type or '(no model_type)'}' ({arch or 'no architectures'}) is not supported",
            f"supported encoder model types: {', '.join(supported_model_types(ENCODER))}; causal LM model types: "
            f"{', '.join(supported_model_types(CAUSAL_LM))}",
        )
    if family.kind == CAUSAL_LM and arch and not causal_arch:
        raise UnsupportedModelError(f"{path} is a {arch}; edgeq exports {family.name} models with their language "
                                    "model head", f"export the {' or '.join(family.architectures)} of the model")
    if family.kind == ENCODER and arch and not arch.endswith("Model"):
        raise UnsupportedModelError(
            f"{path} is a {arch} (a task head); edgeq exports sentence encoders (the base *Model) for embeddings",
            "export the base encoder (architectures: ['BertModel'] or similar) whose last_hidden_state is pooled",
        )
    return family


def inspect_model_dir(path: Path, gguf_file: str | None = None, allow_pickle: bool = False) -> ModelSource:
    """Check a model folder from its files alone (no weights loaded); ``allow_pickle`` lets pytorch_model.bin
    weights through (export then loads them with torch.load(weights_only=True))."""
    path = Path(path)
    if not path.exists():
        raise ModelFolderError(f"model folder {path} does not exist", "pass the folder that holds config.json and the weights")
    if not path.is_dir():
        raise ModelFolderError(f"{path} is not a folder", "pass the model's folder, not a file inside it")
    if gguf_file:
        return inspect_gguf(path, gguf_file)
    refuse_code(path)
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
    model_type = config.get("model_type", "")
    model_type = model_type if isinstance(model_type, str) else ""  # a stranger's config may hold anything
    archs = config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
    family = config_family(path, model_type, arch)
    kind = family.kind
    # after the architecture checks: a wrong model type is the more useful error
    weights, weight_format = select_weights(path, kind, allow_pickle)
    tokenizer_files = tuple(n for n in TOKENIZER_FILES if (path / n).is_file())
    if not tokenizer_files:
        raise ModelFolderError(f"{path} has no tokenizer files", f"expected tokenizer.json (or one of {', '.join(TOKENIZER_FILES)})")
    for name in weights:
        if name.endswith(".safetensors"):
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
        task=family.task,
        weight_files=weights,
        tokenizer_files=tokenizer_files,
        file_hashes={n: sha256_file(path / n) for n in hashed},
        pooling=pooling,
        weight_format=weight_format,
    )


def check_recorded_source(model_dir: Path, recorded: SourceRecord) -> ModelSource:
    """``model_dir`` checked as any model folder is, and required to be the source a package's manifest recorded
    (``recorded``: its source section): the same folder name where recorded, the same files with the same hashes."""
    src = inspect_model_dir(model_dir, recorded.gguf_file or None, allow_pickle=recorded.allow_pickle is True)
    name = recorded.name
    if name is not None and src.name != name:
        raise ModelFolderError(f"{model_dir} is the source '{src.name}', the package was made from '{name}'",
                               f"pass the folder the package was made from (named {name})")
    want, got = recorded.files or {}, src.file_hashes
    changed = [f"{n} ({'missing' if n not in got else 'not in the manifest' if n not in want else 'sha256 differs'})"
               for n in sorted(set(want) | set(got)) if want.get(n) != got.get(n)]
    if changed:
        raise ModelFolderError(f"{model_dir} is not the package's source: {name_list(changed)}",
                               "pass the exact folder the package was made from")
    return src
