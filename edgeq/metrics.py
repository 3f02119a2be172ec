"""Accuracy of a quantized encoder against its FP32 reference."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class EncoderAccuracy:
    mean_cosine: float
    min_cosine: float
    retrieval_top1: float  # fraction of texts whose nearest other text is the same as under FP32
    samples: int

    def to_dict(self) -> dict:
        return asdict(self)


def shown(value: float, bar: float, digits: int = 6) -> str:
    """``value`` for a message that compares it with ``bar``: at least ``digits`` decimals, and as many more as it
    takes for the printed number to stand on the same side of ``bar`` as the value does, and not to read as a
    perfect 1 it is not (a min cosine of 0.99999968 against a bar of 0.9999997 must not print as 1.000000 or
    0.9999997)."""
    for d in range(digits, 18):
        text = f"{value:.{d}f}"
        printed = float(text)
        if (printed < bar) == (value < bar) and (printed == bar) == (value == bar) and (printed == 1) == (value == 1):
            return text
    return repr(value)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def per_sample_cosine(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    return (_unit(ref.astype(np.float64)) * _unit(out.astype(np.float64))).sum(1)


def retrieval_agreement(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Per text: does its nearest other text under ``out`` equal the one under ``ref``? bool [n]."""
    if len(ref) < 2:
        return np.ones(len(ref), dtype=bool)

    def nearest(e: np.ndarray) -> np.ndarray:
        u = _unit(e.astype(np.float64))
        s = u @ u.T
        np.fill_diagonal(s, -np.inf)
        return s.argmax(1)

    return nearest(ref) == nearest(out)


def retrieval_top1(ref: np.ndarray, out: np.ndarray) -> float:
    """Each text queries all the others; agreement = same nearest neighbour under both embeddings."""
    return float(retrieval_agreement(ref, out).mean())


def compare(ref: np.ndarray, out: np.ndarray) -> EncoderAccuracy:
    cos = per_sample_cosine(ref, out)
    return EncoderAccuracy(float(cos.mean()), float(cos.min()), retrieval_top1(ref, out), len(ref))
