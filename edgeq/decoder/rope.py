"""Rotary position tables: the cos/sin caches GroupQueryAttention reads (``do_rotary=1``), one per distinct table.

The caches are [positions, rotary_dim / 2] float32, computed as transformers computes them (float32 inverse
frequencies, position x frequency in float32), so the graph rotates exactly as the model did. Scalings: default,
linear, llama3 (Llama-3.1/3.2's smooth low/high-frequency blend) and longrope (Phi-3/Phi-4-mini).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

KINDS = ("default", "linear", "llama3", "longrope")


@dataclass(frozen=True)
class RotaryTable:
    """One rotary table: the base, how many dimensions of each head it rotates, and its scaling."""

    theta: float
    dim: int  # rotated dimensions per head (head_dim * partial_rotary_factor), even
    kind: str = "default"
    factor: float = 1.0  # linear and llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_positions: int = 0  # llama3 and longrope
    short_factor: tuple[float, ...] = ()  # longrope
    long_factor: tuple[float, ...] = ()  # longrope
    attention_factor: float = 1.0  # longrope: cos and sin are scaled by it


def inverse_frequencies(table: RotaryTable, context_length: int) -> np.ndarray:
    """[dim / 2] float32, as transformers' ROPE_INIT_FUNCTIONS compute them for a sequence of ``context_length``."""
    exponents = np.arange(0, table.dim, 2, dtype=np.int64).astype(np.float32) / np.float32(table.dim)
    base = np.float32(table.theta) ** exponents
    if table.kind == "longrope":
        # transformers switches to the long factors once the sequence passes the original length; a package whose
        # context fits that length never does, so its table is the short one (docs: LongRoPE in limits)
        long = context_length > table.original_max_positions
        factors = np.asarray(table.long_factor if long else table.short_factor, dtype=np.float32)
        return (np.float32(1.0) / (factors * base)).astype(np.float32)
    inv = (np.float32(1.0) / base).astype(np.float32)
    if table.kind == "linear":
        return (inv / np.float32(table.factor)).astype(np.float32)
    if table.kind == "llama3":
        return _llama3(inv, table)
    return inv


def _llama3(inv: np.ndarray, t: RotaryTable) -> np.ndarray:
    """Llama-3.1's scaling: long wavelengths divided by ``factor``, short ones kept, a smooth blend between."""
    low_wavelen = t.original_max_positions / t.low_freq_factor
    high_wavelen = t.original_max_positions / t.high_freq_factor
    wavelen = np.float32(2 * math.pi) / inv
    scaled = np.where(wavelen > low_wavelen, inv / np.float32(t.factor), inv).astype(np.float32)
    smooth = ((t.original_max_positions / wavelen - t.low_freq_factor) /
              (t.high_freq_factor - t.low_freq_factor)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(t.factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rotary_caches(table: RotaryTable, context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each [context_length, dim / 2] float32, for positions 0..context_length-1."""
    inv = inverse_frequencies(table, context_length)
    freqs = np.outer(np.arange(context_length, dtype=np.float32), inv).astype(np.float32)
    scale = np.float32(table.attention_factor)
    return (np.cos(freqs) * scale).astype(np.float32), (np.sin(freqs) * scale).astype(np.float32)
