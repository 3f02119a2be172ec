"""ONNX Runtime sessions and encoder inference shared by calibration, evaluation and verification."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import onnx
import onnxruntime as ort

from edgeq.textdata import token_prefix

BATCH = 16


def session(model: onnx.ModelProto | Path | str, providers: tuple[str, ...] = ("CPUExecutionProvider",),
            optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
            fuse_qdq: bool = False, arena: bool = True, threads: int | None = None,
            data_dir: Path | None = None) -> ort.InferenceSession:
    """A CPU session. ``fuse_qdq=False`` (measurements) runs a QDQ ONNX model's DequantizeLinear -> MatMul in float:
    exactly the integer arithmetic an ARM or VNNI CPU does, on any x86 host (ORT's fused U8S8 kernel saturates in
    int16 on x86 without VNNI; docs/decisions/encoder-quantization.md has what that did). ``fuse_qdq=True`` is for
    speed, where the fused integer kernels are what an app runs; ORT-format packages are fused when written.
    ``arena=False`` returns each run's buffers instead of keeping them for the next run: a decoder's logits over a
    large vocabulary (1B: 263 MB per 512-token window) would otherwise stay held (numerics unchanged).
    ``threads``: intra-op threads (default: ONNX Runtime's, one per physical core). ``data_dir``: where a
    ModelProto's external data is (a model given by path finds its own beside it)."""
    so = ort.SessionOptions()
    so.log_severity_level = 3  # ORT's unused-initializer warnings are noise for edgeq's users
    so.graph_optimization_level = optimization
    so.enable_cpu_mem_arena = arena
    if threads:
        so.intra_op_num_threads = threads
    if not fuse_qdq:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    if data_dir is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(data_dir))
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, so, providers=list(providers))


def encode(tokenizer, texts: tuple[str, ...] | list[str], seq_len: int, input_names: list[str],
           padding: bool | str = True) -> dict[str, np.ndarray]:
    """Token feeds; ``padding="max_length"`` pads every text to exactly ``seq_len`` (static-shape models).

    Each text is cut to a prefix that keeps its first ``seq_len`` tokens before the batch is tokenized: the
    tokenizer would otherwise tokenize all of a long text and only then truncate it."""
    texts = [token_prefix(tokenizer, t, seq_len) for t in texts]
    enc = tokenizer(texts, padding=padding, truncation=True, max_length=seq_len, return_tensors="np")
    feeds = {}
    for name in input_names:
        if name in enc:
            feeds[name] = enc[name].astype(np.int64)
        elif name == "token_type_ids":
            feeds[name] = np.zeros_like(enc["input_ids"], dtype=np.int64)
        else:
            raise KeyError(f"model input '{name}' is not produced by the tokenizer")
    return feeds


def batches(tokenizer, texts, seq_len: int, input_names: list[str], batch: int = BATCH) -> Iterator[dict[str, np.ndarray]]:
    for i in range(0, len(texts), batch):
        yield encode(tokenizer, texts[i:i + batch], seq_len, input_names)


def pool(hidden: np.ndarray, mask: np.ndarray, pooling: str = "mean") -> np.ndarray:
    """Sentence embedding from last_hidden_state: mean over real tokens (sentence-transformers' default) or CLS."""
    if pooling == "cls":
        return hidden[:, 0, :].astype(np.float32)
    m = mask[..., None].astype(np.float32)
    return (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def embed(sess: ort.InferenceSession, tokenizer, texts, seq_len: int, pooling: str = "mean") -> np.ndarray:
    return embed_feeds(sess, batches(tokenizer, texts, seq_len, [i.name for i in sess.get_inputs()]), pooling)


def embed_feeds(sess: ort.InferenceSession, feeds: Iterable[dict[str, np.ndarray]], pooling: str = "mean") -> np.ndarray:
    """Pooled embeddings from token feeds already made (by ``batches``): texts scored many times are encoded once."""
    out = []
    for batch in feeds:
        hidden = sess.run(None, batch)[0]
        out.append(pool(hidden, batch["attention_mask"], pooling))
    return np.concatenate(out)
