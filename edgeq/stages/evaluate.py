"""evaluate: an encoder package's pooled embeddings against the FP32 export's, on held-back text."""

from __future__ import annotations

from pathlib import Path

from edgeq.metrics import EncoderAccuracy, compare
from edgeq.profiles import Profile
from edgeq.runtime import embed, session
from edgeq.textdata import TextSet


def evaluate(model_path: Path, fp32_path: Path, tokenizer, evaluation: TextSet, profile: Profile, pooling: str) -> EncoderAccuracy:
    texts = evaluation.head(profile.accuracy.eval_samples)
    seq = profile.accuracy.eval_seq_len
    ref = embed(session(fp32_path), tokenizer, texts, seq, pooling)
    out = embed(session(model_path), tokenizer, texts, seq, pooling)
    return compare(ref, out)
