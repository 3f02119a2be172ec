"""Where a decoder's tensors come from, one at a time: the ``TensorSource`` protocol and its safetensors reader.

A source answers with Hugging Face parameter names and layouts (``model.layers.0.self_attn.q_proj.weight`` as
[out, in]), whatever the file stores, so the graph builder has one vocabulary. ``get`` returns a float32 copy of one
tensor: the caller holds at most one layer's worth, never the whole model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from edgeq.errors import ModelFolderError, UnsupportedModelError


@runtime_checkable
class TensorSource(Protocol):
    """One checkpoint's tensors by Hugging Face name, read one at a time."""

    def keys(self) -> list[str]:
        """Every parameter name the checkpoint holds (Hugging Face names)."""
        ...

    def get(self, name: str) -> np.ndarray:
        """A float32 copy of one tensor, in the layout Hugging Face stores it. KeyError for an unknown name."""
        ...

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape without reading its data."""
        ...


INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_FLOAT_DTYPES = ("BF16", "F16", "F32")


class SafetensorsSource:
    """A Hugging Face folder's safetensors (one file or shards named by model.safetensors.index.json), read one
    tensor at a time through ``safe_open``: a file is memory-mapped, and only the tensor asked for is copied."""

    def __init__(self, files: dict[str, Path]) -> None:
        self._files = files  # tensor name -> shard holding it
        self._open: dict[Path, object] = {}
        self._ranges: dict[Path, dict[str, tuple[int, int]]] = {}

    def _handle(self, path: Path):
        from safetensors import safe_open

        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="numpy")
        return self._open[path]

    def keys(self) -> list[str]:
        return sorted(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def _slice(self, name: str):
        if name not in self._files:
            raise KeyError(name)
        return self._handle(self._files[name]).get_slice(name)

    def get(self, name: str) -> np.ndarray:
        part = self._slice(name)
        dtype = part.get_dtype()
        if dtype not in _FLOAT_DTYPES:
            raise UnsupportedModelError(f"tensor {name} is stored as {dtype}, not BF16/F16/F32",
                                        "pass a checkpoint of floating-point weights (dequantize it first)")
        if dtype == "BF16":  # numpy has no bfloat16: read the raw 16-bit words and widen them into float32's top half
            path = self._files[name]
            if path not in self._ranges:
                self._ranges[path] = _offsets(path)
            return _bf16_to_f32(path, self._ranges[path][name], tuple(part.get_shape()))
        return np.array(part[:], dtype=np.float32)

    def close(self) -> None:
        self._open.clear()
        self._ranges.clear()


def _bf16_to_f32(path: Path, byte_range: tuple[int, int], shape: tuple[int, ...],
                 chunk: int = 1 << 24) -> np.ndarray:
    """One BF16 tensor as float32, read straight from its byte range (safe_open's numpy view refuses BF16): each
    16-bit word becomes float32's top half, a chunk at a time, so memory holds the result and one chunk."""
    begin, end = byte_range
    out = np.empty((end - begin) // 2, np.uint32)
    with open(path, "rb") as f:
        f.seek(begin)
        for start in range(0, out.size, chunk):
            words = np.fromfile(f, dtype="<u2", count=min(chunk, out.size - start))
            np.left_shift(words, 16, out=out[start:start + words.size], dtype=np.uint32)
    return out.view(np.float32).reshape(shape)


def _offsets(path: Path) -> dict[str, tuple[int, int]]:
    """name -> absolute (begin, end) byte range of each tensor in a safetensors file (its JSON header)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: (8 + size + v["data_offsets"][0], 8 + size + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def open_safetensors(folder: Path) -> SafetensorsSource:
    """The checkpoint in ``folder``: model.safetensors.index.json's shards, else model.safetensors.
    ModelFolderError when neither is there or the index names a file outside the folder."""
    folder = Path(folder)
    index = folder / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFolderError(f"{index} has no weight_map", "re-save the checkpoint with save_pretrained")
        files = {}
        for name, shard in weight_map.items():
            path = folder / str(shard)
            if Path(str(shard)).name != str(shard) or not path.is_file():
                raise ModelFolderError(f"{INDEX} names shard {shard!r}, which is not a file in {folder}",
                                       "copy every shard the index names into the model folder")
            files[name] = path
        return SafetensorsSource(files)
    single = folder / SINGLE
    if not single.is_file():
        raise ModelFolderError(f"{folder} has neither {SINGLE} nor {INDEX}",
                               "pass a Hugging Face model folder saved with safetensors")
    from safetensors import safe_open

    with safe_open(str(single), framework="numpy") as f:
        names = list(f.keys())
    return SafetensorsSource({n: single for n in names})
