"""DecoderSpec from config.json: what each family sets, and the refusals (UnsupportedModelError naming the key)."""

from __future__ import annotations

import json

import pytest

from edgeq.decoder.spec import decoder_spec
from edgeq.errors import UnsupportedModelError

LLAMA = dict(model_type="llama", num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=100, max_position_embeddings=256, rms_norm_eps=1e-5)


def test_gemma3_layers_pick_their_table_and_window(tiny_checkpoints):
    config = json.loads((tiny_checkpoints("gemma3_text") / "config.json").read_text())
    spec = decoder_spec(config)
    assert spec.layer_window == (6, None) and spec.layer_rotary == (1, 0)
    assert spec.rotary[0].kind == "linear" and spec.rotary[0].factor == 2.0 and spec.rotary[1].theta == 10000.0
    assert spec.norm_offset == 1.0 and spec.sandwich_norms and spec.qk_norm and spec.embedding_scale == 8.0
    assert spec.attention_scale == pytest.approx(16 ** -0.5)


def test_smollm3_nope_layers_have_no_table():
    spec = decoder_spec(LLAMA | dict(model_type="smollm3", no_rope_layer_interval=2))
    assert spec.layer_rotary == (0, None, 0, None)


def test_llama3_rope_scaling():
    spec = decoder_spec(LLAMA | dict(rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}))
    assert spec.rotary[0].kind == "llama3" and spec.rotary[0].original_max_positions == 8192 and not spec.tied


@pytest.mark.parametrize("config, match", [
    (LLAMA | dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (LLAMA | dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling type 'yarn' is not supported"),
    (LLAMA | dict(rope_scaling="linear"), "rope_scaling is 'linear', not an object"),
    (LLAMA | dict(hidden_act="relu"), "activation 'relu' is not supported"),
    (LLAMA | dict(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
    (LLAMA | dict(hidden_size=None), "hidden_size is None, not a positive integer"),
    (LLAMA | dict(model_type="qwen2", use_sliding_window=True, sliding_window=64), "use_sliding_window=true"),
    (LLAMA | dict(model_type="gemma3_text", use_bidirectional_attention=True), "bidirectional"),
    (LLAMA | dict(model_type="gemma3_text", layer_types=["full_attention"]), "layer_types"),
    (LLAMA | dict(model_type="phi3", partial_rotary_factor=0.2), r"rotary dimension 3 \(head_dim x"),
    (LLAMA | dict(model_type="phi3", partial_rotary_factor=0.75), "half of it to be a multiple of 8"),
    (LLAMA | dict(model_type="phi3", rope_scaling={"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}),
     "short_factor/long_factor have 1/1 entries, not rotary_dim/2 = 8"),
    # a stranger's config holds anything: a wrong type or a zero is refused by name, never a traceback
    (LLAMA | dict(rope_theta=None), "rope_theta is None, not a positive number"),
    (LLAMA | dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling low_freq_factor is None"),
    (LLAMA | dict(rope_scaling={"rope_type": "linear", "factor": "2"}), "rope_scaling factor is '2'"),
    (LLAMA | dict(num_key_value_heads="2"), "num_key_value_heads is '2', not a positive integer"),
    (LLAMA | dict(model_type="mistral", sliding_window="64"), "sliding_window is '64', not a positive integer"),
    (LLAMA | dict(model_type="gemma3_text", sliding_window_pattern=0), "sliding_window_pattern is 0"),
    (LLAMA | dict(model_type="smollm3", no_rope_layer_interval=0), "no_rope_layer_interval is 0"),
    (LLAMA | dict(model_type="smollm3", no_rope_layers=[1]), "no_rope_layers has 1 entries for 4 layers"),
    (LLAMA | dict(rms_norm_eps=float("nan")), "rms_norm_eps is nan"),
])
def test_refusals(config, match):
    with pytest.raises(UnsupportedModelError, match=match) as info:
        decoder_spec(config)
    assert info.value.hint
