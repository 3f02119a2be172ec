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


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
LONGROPE = {"type": "longrope", "short_factor": [1.0 + 0.1 * k for k in range(8)],
            "long_factor": [2.0 + 0.5 * k for k in range(8)]}
PHI4 = LLAMA | dict(model_type="phi3", num_attention_heads=2, num_key_value_heads=1,
                    original_max_position_embeddings=64)
GEMMA3 = LLAMA | dict(model_type="gemma3_text", num_hidden_layers=2, sliding_window=6, head_dim=16,
                      layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=16)
# (transformers 4.x's spelling, 5.x's): config.json as each writes the same settings (5.x's as its config classes'
# to_dict gives them: rope_theta and partial_rotary_factor inside rope_parameters, Gemma-3's nested by layer type)
SPELLINGS = {
    "llama3": (LLAMA | dict(rope_theta=500000.0, rope_scaling=LLAMA3),
               LLAMA | dict(rope_parameters=LLAMA3 | {"rope_theta": 500000.0})),
    "plain": (LLAMA | dict(rope_theta=20000.0), LLAMA | dict(rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 20000.0})),
    "gemma3": (GEMMA3 | dict(rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear",
                                                                                     "factor": 8.0}),
               GEMMA3 | dict(rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                              "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                 "rope_theta": 1e6}})),
    "phi4_longrope": (PHI4 | dict(partial_rotary_factor=0.5, rope_scaling=LONGROPE),
                      PHI4 | dict(partial_rotary_factor=0.5, rope_parameters=LONGROPE | {
                          "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                          "original_max_position_embeddings": 64})),
}


@pytest.mark.parametrize("name", list(SPELLINGS))
def test_both_rope_spellings_build_the_same_tables(name):
    """A checkpoint saved by transformers 5 states its rotary settings in rope_parameters only: read as 4.x's keys."""
    old, new = (decoder_spec(c) for c in SPELLINGS[name])
    assert old.rotary == new.rotary and old.layer_rotary == new.layer_rotary
    assert old.rotary[0].kind != "default" or old.rotary[0].theta == 20000.0  # the settings were read, not defaulted


def test_rope_scaling_wins_over_rope_parameters():  # as transformers 5 reads a config holding both
    spec = decoder_spec(LLAMA | dict(rope_scaling={"rope_type": "linear", "factor": 2.0},
                                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0}))
    assert (spec.rotary[0].kind, spec.rotary[0].factor, spec.rotary[0].theta) == ("linear", 2.0, 10000.0)


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
    (LLAMA | dict(rope_parameters=[1]), "rope_parameters is \\[1\\], not an object"),
    (LLAMA | dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope_parameters type 'yarn'"),
    (LLAMA | dict(rope_parameters={"rope_type": "default", "rope_theta": "1e4"}), "rope_parameters rope_theta is"),
    (GEMMA3 | dict(rope_parameters={"full_attention": 5}), "rope_parameters full_attention is 5"),
    # transformers 4.57 and 5.x disagree on this LongRoPE's attention factor: refused, never guessed
    (PHI4 | dict(partial_rotary_factor=0.5, rope_scaling=LONGROPE | {"factor": 2.0}), "4.57 derives LongRoPE's"),
])
def test_refusals(config, match):
    with pytest.raises(UnsupportedModelError, match=match) as info:
        decoder_spec(config)
    assert info.value.hint
