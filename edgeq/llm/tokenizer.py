"""The package tokenizer: files that onnxruntime-genai's tokenizer (onnxruntime-extensions) reads to the same ids.

The reference is the source folder's tokenizer as transformers loads it; the package must encode every text to
exactly its ids, BOS included, and decode them back to its text. onnxruntime-extensions 0.18 reads some files
differently, so: a byte-level BPE whose decoder has a ``Replace "▁" -> " "`` step (transformers writes one for a GGUF
BPE) gets a plain ByteLevel decoder and the class ``PreTrainedTokenizerFast``; tokenizer_config.json always states
``add_bos_token``/``add_eos_token`` as measured on the source, so nothing is guessed, plus the chat template. A
tokenizer that already works keeps its tokenizer.json byte for byte. onnxruntime-genai encodes without special
tokens unless the app calls ``update_options(add_special_tokens="true")``: :func:`og_tokenizer` and
:mod:`edgeq.llm.genai` do; apps must too.
Each difference and what was measured: see docs/decisions/genai-packaging.md.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeq.errors import ModelFolderError, UnsupportedModelError
from edgeq.safe_load import load_tokenizer

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
CHAT_TEMPLATE = "chat_template.jinja"
BYTE_LEVEL_DECODER = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
SPM_SPACE = "\u2581"
# the parts of tokenizer.json a tokenizer class may replace: the package gets what transformers runs
PIPELINE = ("normalizer", "pre_tokenizer", "post_processor", "decoder")
PROBE = "Hello world"  # any text that encodes to ordinary tokens shows what the tokenizer adds around them


@dataclass(frozen=True)
class TokenizerReport:
    files: tuple[str, ...]  # written into the package folder
    rewritten: bool  # tokenizer.json differs from the source's
    changes: tuple[str, ...]  # what was changed and why, one line each
    add_bos_token: bool
    add_eos_token: bool


@dataclass(frozen=True)
class TokenizerMismatch:
    text: str
    kind: str  # "encode" (ids differ) or "decode" (text from the source ids differs)
    expected: list[int] | str
    got: list[int] | str


def load_source_tokenizer(src_dir: Path):
    """The source folder's fast tokenizer, as transformers loads it; ModelFolderError if it has none."""
    src_dir = Path(src_dir)
    if not (src_dir / TOKENIZER_JSON).is_file() and not (src_dir / TOKENIZER_CONFIG).is_file():
        raise ModelFolderError(
            f"{src_dir} has no tokenizer (no {TOKENIZER_JSON} or {TOKENIZER_CONFIG})",
            "copy the model's tokenizer files into the folder, e.g. "
            "AutoTokenizer.from_pretrained(<model id>).save_pretrained(<folder>)",
        )
    tok = load_tokenizer(src_dir)
    if not tok.is_fast:
        raise ModelFolderError(f"the tokenizer in {src_dir} has no fast (tokenizer.json) form",
                               "save it as a fast tokenizer: AutoTokenizer.from_pretrained(dir).save_pretrained(dir)")
    return tok


def added_special_tokens(tok) -> tuple[bool, bool]:
    """(adds BOS, adds EOS), measured: the ids of PROBE with and without special tokens."""
    plain = tok(PROBE, add_special_tokens=False).input_ids
    full = tok(PROBE).input_ids
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    prefix, suffix = (full[:start], full[start + len(plain):]) if start is not None else (full, [])
    add_bos, add_eos = prefix == [tok.bos_token_id], suffix == [tok.eos_token_id]
    if start is None or (prefix and not add_bos) or (suffix and not add_eos):
        raise UnsupportedModelError(
            f"the tokenizer adds {prefix} before and {suffix} after each text; onnxruntime-genai can only add "
            f"the BOS ({tok.bos_token_id}) and EOS ({tok.eos_token_id}) tokens",
            "use a model whose tokenizer adds at most its BOS and EOS tokens",
        )
    return add_bos, add_eos


def _steps(node: dict | None) -> list[dict]:
    """A tokenizer.json component and, for a Sequence, its members."""
    if not node:
        return []
    members = node.get("pretokenizers") or node.get("decoders") or []
    return [node, *members]


def is_byte_level(tokenizer_json: dict) -> bool:
    return tokenizer_json.get("model", {}).get("type") == "BPE" and any(
        s.get("type") == "ByteLevel" for s in _steps(tokenizer_json.get("pre_tokenizer")))


def has_spm_decoder(tokenizer_json: dict) -> bool:
    """The decoder onnxruntime-extensions takes for a SentencePiece model (a Replace of "▁")."""
    return any(s.get("type") == "Replace" and s.get("pattern", {}).get("String") == SPM_SPACE
               for s in _steps(tokenizer_json.get("decoder")))


def package_tokenizer_json(tok, source_json: dict | None) -> tuple[dict | None, list[str]]:
    """The package's tokenizer.json (None: copy the source's file unchanged) and the reasons for each change."""
    effective = json.loads(tok.backend_tokenizer.to_str())  # what transformers runs, post-processor included
    differ = [k for k in PIPELINE if effective.get(k) != (source_json or {}).get(k)]
    changes = []
    if "post_processor" in differ:
        changes.append("post_processor: written as transformers applies it (tokenizer_config.json overrides "
                       "tokenizer.json's for this tokenizer class)")
    # transformers 5 builds some model types' pipeline in the class, whatever tokenizer.json says (Qwen2: its own
    # split regex and NFC; the tiny qwen2's package differed on 16 of the 64 texts the export checks without this)
    changes += [f"{k}: written as transformers runs it (its tokenizer class for this model builds its own, not "
                "tokenizer.json's)" for k in differ if k != "post_processor"]
    if is_byte_level(effective) and has_spm_decoder(effective):
        effective["decoder"] = dict(BYTE_LEVEL_DECODER)
        changes = [c for c in changes if not c.startswith("decoder:")] + [
            "decoder: SentencePiece-style (Replace '▁') on a byte-level BPE -> ByteLevel; onnxruntime-genai "
            "otherwise encodes every space as -1"]
    if source_json is not None and not changes:
        return None, []
    return effective, changes


def package_tokenizer_config(source_config: dict, tok, *, byte_level: bool, add_bos: bool, add_eos: bool,
                             chat_template: str | None) -> tuple[dict, list[str]]:
    config, changes = dict(source_config), []
    cls = config.get("tokenizer_class") or ""
    if (byte_level and cls.startswith("Llama")) or not cls:
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        changes.append(f"tokenizer_class: {cls or 'missing'} -> PreTrainedTokenizerFast (onnxruntime-genai "
                       "picks the pre-tokenizer regex by class; Llama's splits byte-level text differently)")
    for key, value in (("add_bos_token", add_bos), ("add_eos_token", add_eos)):
        if config.get(key) != value:
            changes.append(f"{key}: {config.get(key)} -> {value} (measured on the source tokenizer)")
        config[key] = value
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):  # onnxruntime-genai finds the ids by these
        value = getattr(tok, key, None)
        if value is not None and key not in config:
            config[key] = str(value)
    if chat_template and not config.get("chat_template"):
        config["chat_template"] = chat_template
        changes.append("chat_template: copied in from chat_template.jinja (onnxruntime-genai reads it only here)")
    return config, changes


def write_package_tokenizer(src_dir: Path, out_dir: Path) -> TokenizerReport:
    """Write tokenizer.json, tokenizer_config.json (and special_tokens_map.json, chat_template.jinja where the
    source has them) into ``out_dir`` so that onnxruntime-genai tokenizes as the source tokenizer does."""
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    tok = load_source_tokenizer(src_dir)
    add_bos, add_eos = added_special_tokens(tok)
    src_json_path = src_dir / TOKENIZER_JSON
    source_json = json.loads(src_json_path.read_text()) if src_json_path.is_file() else None
    new_json, json_changes = package_tokenizer_json(tok, source_json)
    src_config_path = src_dir / TOKENIZER_CONFIG
    source_config = json.loads(src_config_path.read_text()) if src_config_path.is_file() else {}
    template = (src_dir / CHAT_TEMPLATE).read_text() if (src_dir / CHAT_TEMPLATE).is_file() else tok.chat_template
    config, config_changes = package_tokenizer_config(
        source_config, tok, byte_level=is_byte_level(new_json or source_json or {}), add_bos=add_bos,
        add_eos=add_eos, chat_template=template if isinstance(template, str) else None)

    out_dir.mkdir(parents=True, exist_ok=True)
    if new_json is None:
        shutil.copy(src_json_path, out_dir / TOKENIZER_JSON)
    else:
        (out_dir / TOKENIZER_JSON).write_text(json.dumps(new_json, ensure_ascii=False, indent=2) + "\n")
    (out_dir / TOKENIZER_CONFIG).write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    files = [TOKENIZER_JSON, TOKENIZER_CONFIG]
    for name in (SPECIAL_TOKENS_MAP, CHAT_TEMPLATE):
        if (src_dir / name).is_file():
            shutil.copy(src_dir / name, out_dir / name)
            files.append(name)
    return TokenizerReport(tuple(files), new_json is not None, tuple(json_changes + config_changes), add_bos, add_eos)


@contextlib.contextmanager
def og_tokenizer(package_dir: Path) -> Iterator:
    """onnxruntime-genai's tokenizer for a package folder, special tokens on (as :mod:`edgeq.llm.genai` runs it).

    og.Tokenizer opens a folder through its genai_config.json; a folder with only tokenizer files (during export,
    or in tests) is read through a temporary copy with a stub config, which the tokenizer does not otherwise use.
    """
    import onnxruntime_genai as og

    package_dir = Path(package_dir)
    with contextlib.ExitStack() as stack:
        folder = package_dir
        if not (package_dir / "genai_config.json").is_file():
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgeq-tok-")))
            for name in (TOKENIZER_JSON, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP):
                if (package_dir / name).is_file():
                    shutil.copy(package_dir / name, folder / name)
            stub = {"model": {"type": "decoder", "vocab_size": 1, "context_length": 1,
                              "decoder": {"filename": "absent.onnx"}}, "search": {}}
            (folder / "genai_config.json").write_text(json.dumps(stub))
        tok = og.Tokenizer(str(folder))
        tok.update_options(add_special_tokens="true")
        yield tok


def check_tokenizer(src_dir: Path, package_dir: Path, texts: Sequence[str]) -> list[TokenizerMismatch]:
    """Every text where onnxruntime-genai's ids differ from the source tokenizer's, or where decoding the source's
    ids gives a different text than transformers' decode of them.

    The decode reference skips special tokens (onnxruntime-genai does) and transformers' optional
    ``clean_up_tokenization_spaces``: that cleanup rewrites the text (" ." -> ".", " 'x'" -> "'x'"; transformers
    turns it on for GGUF tokenizers), onnxruntime-genai 0.18 does not apply it, and without it the decoded text is
    the original one (measured: all 720 calibration and evaluation texts of SmolLM2's GGUF tokenizer)."""
    src = load_source_tokenizer(src_dir)
    special = set(src.all_special_ids)
    mismatches = []
    with og_tokenizer(package_dir) as tok:
        for text in texts:
            expected = list(src(text).input_ids)
            got = [int(i) for i in tok.encode(text)]
            if got != expected:
                mismatches.append(TokenizerMismatch(text, "encode", expected, got))
            # onnxruntime-extensions decodes an all-special sequence to U+FFFD instead of "": skip those.
            if not set(expected) <= special:
                want = src.decode(expected, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                have = tok.decode(expected)
                if have != want:
                    mismatches.append(TokenizerMismatch(text, "decode", want, have))
    return mismatches
