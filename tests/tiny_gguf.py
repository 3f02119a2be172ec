"""Tiny GGUF files written by the ``gguf`` package: the header and metadata edgeq's checks read, and one small
tensor, not a loadable model. What a check must refuse before dequantization is tested on these."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def tiny_gguf(path: Path, arch: str, context_length: int | None = None) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    w.add_file_type(0)
    if context_length is not None:
        w.add_context_length(context_length)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
