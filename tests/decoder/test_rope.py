"""Rotary caches against transformers' ROPE_INIT_FUNCTIONS (inverse frequencies and attention factor) and its
cos/sin arithmetic, for each scaling the builder supports."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.decoder.rope import rotary_caches
from edgeq.decoder.spec import decoder_spec

BASE = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=100, max_position_embeddings=256)
LONGROPE = dict(rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * k for k in range(8)],
                              "long_factor": [2.0 + 0.5 * k for k in range(8)]},
                original_max_position_embeddings=64, partial_rotary_factor=0.5, num_attention_heads=2,
                num_key_value_heads=1)
CASES = {
    "default": ("llama", "LlamaConfig", {}),
    "linear": ("llama", "LlamaConfig", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama3": ("llama", "LlamaConfig", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "longrope": ("phi3", "Phi3Config", LONGROPE),
}


def _init_function(kind: str):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if kind in ROPE_INIT_FUNCTIONS:
        return ROPE_INIT_FUNCTIONS[kind]
    # transformers 5 keeps plain RoPE in each model's rotary class, not in the table
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding.compute_default_rope_parameters


def _reference(cfg, kind: str, seq_len: int):
    import torch

    inv, factor = _init_function(kind)(cfg, device=torch.device("cpu"), seq_len=seq_len)
    freqs = torch.arange(seq_len, dtype=torch.float32)[:, None] * inv.float()[None, :]
    return (freqs.cos() * factor).numpy(), (freqs.sin() * factor).numpy()


@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("positions", [48, 200])  # 200 > the original lengths: llama3's and longrope's long side
def test_caches_match_transformers(kind, positions):
    import transformers

    model_type, cls, extra = CASES[kind]
    cfg = getattr(transformers, cls)(**(BASE | extra))
    spec = decoder_spec(cfg.to_dict() | {"model_type": model_type})
    cos, sin = rotary_caches(spec.rotary[0], positions)
    ref_cos, ref_sin = _reference(cfg, kind, positions)
    assert cos.shape == ref_cos.shape == (positions, spec.rotary[0].dim // 2)
    # float32 cos/sin of the same float32 angles: numpy's and torch's libm differ by an ulp or two
    np.testing.assert_allclose(cos, ref_cos, atol=2e-6, rtol=0)
    np.testing.assert_allclose(sin, ref_sin, atol=2e-6, rtol=0)
