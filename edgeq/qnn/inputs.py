"""Token inputs at the model's static shape: every batch padded to ``batch_size`` texts of exactly ``seq_len`` tokens."""

from __future__ import annotations

import numpy as np

from edgeq.runtime import encode, pool


def static_feeds(tokenizer, texts, seq_len: int, batch_size: int, input_names: list[str]) -> list[dict[str, np.ndarray]]:
    """One feed per ``batch_size`` texts; a short last batch is filled with empty texts (dropped by ``pooled``)."""
    texts = list(texts)
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        out.append(encode(tokenizer, chunk + [""] * (batch_size - len(chunk)), seq_len, input_names, "max_length"))
    return out


def pooled(outputs: list[np.ndarray], feeds: list[dict[str, np.ndarray]], n: int, pooling: str) -> np.ndarray:
    """Pooled embeddings of the first ``n`` texts from each feed's first output."""
    return np.concatenate([pool(o, f["attention_mask"], pooling) for o, f in zip(outputs, feeds)])[:n]


def embed_static(sess, tokenizer, texts, seq_len: int, batch_size: int, pooling: str) -> np.ndarray:
    feeds = static_feeds(tokenizer, texts, seq_len, batch_size, [i.name for i in sess.get_inputs()])
    return pooled([sess.run(None, f)[0] for f in feeds], feeds, len(texts), pooling)
