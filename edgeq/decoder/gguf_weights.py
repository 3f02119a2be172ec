"""A GGUF causal LM as a ``TensorSource``: Hugging Face names and layouts, one tensor dequantized at a time.

``gguf.GGUFReader`` maps the file; ``get`` dequantizes one tensor (``gguf.quants.dequantize``), so the whole model
never exists in float. Names follow llama.cpp's convert_hf_to_gguf.py backwards, as transformers 4.57's GGUF loader
maps them (Phi-3's fused ``attn_qkv`` / ``ffn_up`` stay fused: ``qkv_proj`` / ``gate_up_proj``). llama.cpp permutes
Q/K rows of the ``llama`` architecture (Mistral checkpoints are written as ``llama`` too) for its interleaved rotary
pairs; ``get`` undoes it as transformers' ``LlamaTensorProcessor`` does. ``gguf_folder`` writes config.json, the
generation config and the tokenizer from the GGUF's metadata alone (transformers' own conversion, no tensor read).
"""

from __future__ import annotations

import mmap
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.errors import ModelFolderError, UnsupportedModelError
from edgeq.families import by_model_type
from edgeq.llm.gguf_source import alone_folder, gguf_tokenizer, quiet_transformers, safe_kwargs
from edgeq.modelsource import GgufInfo, gguf_family, name_list, read_gguf_info

# GGUF architectures read here, and whether llama.cpp permuted their Q/K rows. transformers 4.57 with gguf 0.19
# cannot load a GGUF whose architecture is 'mistral' (gguf-py has no such name; llama.cpp writes Mistral as 'llama').
ARCHS = {"llama": True, "qwen2": False, "phi3": False}
TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
       "output.weight": "lm_head.weight"}
# blk.N.<GGUF> -> model.layers.N.<HF> (before the .weight / .bias suffix)
LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
         "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_qkv": "self_attn.qkv_proj",
         "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj"}
PHI3_LAYER = LAYER | {"ffn_up": "mlp.gate_up_proj"}  # Phi-3's fused gate|up is llama.cpp's ffn_up
# Rotary frequency factors llama.cpp stores as tensors; transformers' loader has no parameter for them and skips them.
NOT_PARAMETERS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")
SLICE_VALUES = 1 << 22  # values dequantized at once (16 MiB of float32)


@dataclass(frozen=True)
class Geometry:
    """What naming and un-permuting need from the GGUF's metadata."""

    arch: str
    layers: int
    heads: int
    kv_heads: int


def hf_name(arch: str, gguf_name: str) -> str | None:
    """The Hugging Face parameter of a GGUF tensor; None for one that is not a parameter of the family."""
    if gguf_name in TOP:
        return TOP[gguf_name]
    parts = gguf_name.split(".")
    table = PHI3_LAYER if arch == "phi3" else LAYER
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in table:
        return f"model.layers.{parts[1]}.{table[parts[2]]}.{parts[3]}"
    return None


def expected_names(geometry: Geometry) -> list[str]:
    """The parameters every checkpoint of the architecture has (the head is absent when tied to the embedding)."""
    if geometry.arch == "phi3":
        linears = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    else:
        linears = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    per_layer = [f"{m}.weight" for m in ("input_layernorm", "post_attention_layernorm") + linears]
    if geometry.arch == "qwen2":
        per_layer += [f"self_attn.{p}_proj.bias" for p in "qkv"]
    return ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{name}" for i in range(geometry.layers) for name in per_layer]


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's LlamaModel.permute (interleaved rotary pairs -> HF's rotate-half halves), as transformers'
    LlamaTensorProcessor._reverse_permute_weights does."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


class GgufTensors:
    """``TensorSource`` over a GGUF file: ``keys()`` Hugging Face names, ``get(name)`` a float32 copy of one
    tensor in HF's layout (Linear weights [out, in]), ``shape(name)`` without reading it."""

    def __init__(self, path: Path) -> None:
        import gguf

        self.path = Path(path)
        info = read_gguf_info(self.path)  # refuses a file that is not GGUF
        reader = gguf.GGUFReader(str(self.path))
        self.geometry = read_geometry(reader, info)
        # Only the tensor records and the file map are kept: the parsed metadata (a numpy view per vocabulary
        # entry and merge) is most of a reader's memory, 160 MB for SmolLM2's 49k-token vocabulary (measured).
        self._map = reader.data
        expected = expected_names(self.geometry)
        allowed = set(expected) | {"lm_head.weight"}
        self.tensors = {}
        unknown = []  # transformers drops these silently (a llama GGUF's q/k/v biases): refused, never ignored
        for tensor in reader.tensors:
            name = hf_name(self.geometry.arch, tensor.name)
            if name in allowed:
                self.tensors[name] = tensor
            elif tensor.name not in NOT_PARAMETERS:
                unknown.append(tensor.name)
        scaled = sorted(t.name for t in reader.tensors if t.name in NOT_PARAMETERS)
        if scaled:  # transformers' GGUF config keeps no rope scaling: the package would rotate as plain RoPE
            raise UnsupportedModelError(
                f"the GGUF {self.path} scales its rotary frequencies ({', '.join(scaled)}: Llama-3.x or a LongRoPE "
                "Phi-3), which the config read from a GGUF loses, so edgeq would build plain RoPE",
                "export the model's safetensors checkpoint instead (its config.json keeps rope_scaling)")
        missing = [n for n in expected if n not in self.tensors]
        if missing or unknown:
            problems = [f"{len(names)} {what}: {name_list(names)}"
                        for what, names in (("missing", missing), ("not of the architecture", unknown)) if names]
            raise ModelFolderError(f"the GGUF {self.path} does not hold the tensors of a '{self.geometry.arch}' "
                                   f"model: {'; '.join(problems)}",
                                   "re-download or re-convert the GGUF with llama.cpp's convert_hf_to_gguf.py")

    def keys(self) -> list[str]:
        return sorted(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in reversed(self._tensor(name).shape))  # GGML lists dimensions innermost first

    def get(self, name: str) -> np.ndarray:
        tensor = self._tensor(name)
        w = dequantized(tensor, self.shape(name))
        if ARCHS[self.geometry.arch] and name.endswith(("q_proj.weight", "k_proj.weight")):
            g = self.geometry
            w = np.ascontiguousarray(unpermute(w, g.heads if name.endswith("q_proj.weight") else g.kv_heads))
        self._release(tensor)
        return w

    def _tensor(self, name: str):
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path} holds no tensor {name!r}") from None

    def _release(self, tensor) -> None:
        """Drop the file pages of a tensor already read from this process's resident set: the page cache keeps
        them, so reading every tensor once does not leave the whole file counted in RSS."""
        mapped = getattr(self._map, "_mmap", None)
        if mapped is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = tensor.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
        mapped.madvise(mmap.MADV_DONTNEED, start, min(tensor.data_offset + int(tensor.n_bytes), len(mapped)) - start)


def dequantized(tensor, shape: tuple[int, ...]) -> np.ndarray:
    """A float32 copy of one GGUF tensor, dequantized a slice of rows at a time: gguf's dequantizer keeps every
    16-row group's result in a list before concatenating them (twice the output, plus temporaries), so slicing
    bounds that to a slice (the whole output is one allocation)."""
    from gguf.quants import dequantize

    try:
        return _dequantized(tensor, shape, dequantize)
    except NotImplementedError:  # gguf 0.19 cannot dequantize Q8_1, Q8_K, I8..I64, F64, Q1_0
        raise UnsupportedModelError(f"tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the gguf "
                                    "package cannot dequantize",
                                    "pass a GGUF quantized as F32, F16, BF16, Q4_0..Q8_0, a K-quant or an IQ "
                                    "type") from None


def _dequantized(tensor, shape: tuple[int, ...], dequantize) -> np.ndarray:
    out = np.empty(shape, np.float32)
    if len(shape) < 2:
        out[...] = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        return out
    step = max(1, SLICE_VALUES // int(np.prod(shape[1:])))
    for start in range(0, shape[0], step):  # tensor.data's first axis is the outermost dimension, as HF's
        out[start:start + step] = dequantize(tensor.data[start:start + step], tensor.tensor_type).reshape(
            -1, *shape[1:])
    return out


def read_geometry(reader, info: GgufInfo) -> Geometry:
    if info.architecture not in ARCHS:
        raise UnsupportedModelError(f"{info.path} holds a '{info.architecture}' model, which edgeq does not read "
                                    "tensor by tensor",
                                    f"the GGUF architectures read are {', '.join(sorted(ARCHS))} (llama.cpp's "
                                    "convert_hf_to_gguf.py writes Mistral checkpoints as 'llama')")

    def number(key: str) -> int | None:
        field = reader.fields.get(f"{info.architecture}.{key}")
        return None if field is None else int(field.parts[field.data[0]][0])

    layers, heads = number("block_count"), number("attention.head_count")
    if layers is None or heads is None:
        raise ModelFolderError(f"the GGUF {info.path} lacks {info.architecture}.block_count or "
                               f"{info.architecture}.attention.head_count",
                               "re-convert the GGUF with llama.cpp's convert_hf_to_gguf.py")
    kv_heads = number("attention.head_count_kv")
    return Geometry(info.architecture, layers, heads, heads if kv_heads is None else kv_heads)


def gguf_folder(gguf_path: Path, out_dir: Path) -> tuple[Path, GgufTensors]:
    """Write config.json, generation_config.json and the tokenizer files (no weights) of the GGUF at ``gguf_path``
    into ``out_dir``, as transformers would from the GGUF's metadata; return the folder and the tensor source."""
    from transformers import AutoConfig, GenerationConfig

    info = read_gguf_info(Path(gguf_path))
    gguf_family(info)
    source = GgufTensors(info.path)  # refuses an architecture or tensor set it cannot read before writing anything
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The tokenizer is saved while the GGUF link exists: transformers names the class LlamaTokenizer (not ...Fast)
    # only when its vocab file (the GGUF) is still there, as in materialize_gguf's folder.
    with tempfile.TemporaryDirectory(prefix="edgeq-gguf-") as tmp:
        alone = alone_folder(info, Path(tmp))
        gguf_tokenizer(alone, info).save_pretrained(str(out_dir))
        with quiet_transformers():
            config = AutoConfig.from_pretrained(str(alone), **safe_kwargs(info))
    config.architectures = [by_model_type(config.model_type).architectures[0]]  # as the saved model's class
    config.dtype = "float32"  # what the source yields, as materialize_gguf's FP32 model records
    config.save_pretrained(str(out_dir))
    GenerationConfig.from_model_config(config).save_pretrained(str(out_dir))
    return out_dir, source
