"""edgeq.checkpoint.check_complete on causal LMs: the tensors compared by name as edgeq.decoder reads them, with what
transformers also lets pass (a tied head's copy, old rotary buffers) let pass, on the tiny random Llama. The same in
transformers 4.57 and 5.x (encoders: tests/hostile/test_model_folder.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from llm.tiny_families import tiny_family
from safetensors.torch import load_file, save_file

from edgeq.checkpoint import check_complete
from edgeq.errors import ModelFolderError
from edgeq.modelsource import inspect_model_dir

Q_BIAS = "model.layers.0.self_attn.q_proj.bias"


def rewritten(tiny_dir: Path, tmp_path: Path, change) -> Path:
    folder = Path(shutil.copytree(tiny_dir, tmp_path / "llama"))
    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("change", [
    lambda s: s.__setitem__("lm_head.weight", s["model.embed_tokens.weight"].clone()),  # tied, saved twice anyway
    lambda s: s.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8)),  # before 4.3x's move
    lambda s: s.__setitem__("model.rotary_emb.inv_freq", torch.ones(8)),  # a buffer, never loaded
], ids=["tied-head-copy", "layer-inv-freq", "model-inv-freq"])
def test_what_transformers_lets_pass_passes(tiny_dir, tmp_path, change):
    check_complete(inspect_model_dir(rewritten(tiny_dir, tmp_path, change)))


def _strip_prefix(state):
    for key in list(state):
        state[key.removeprefix("model.")] = state.pop(key)


@pytest.mark.parametrize("change, expected", [
    (lambda s: s.pop("model.norm.weight"), "1 missing: model.norm.weight"),
    (lambda s: s.__setitem__(Q_BIAS, torch.ones(64)), f"1 unexpected: {Q_BIAS}"),  # Llama without attention_bias
    (lambda s: s.__setitem__("model.norm.weight", torch.ones(32)),
     "1 with another shape: model.norm.weight [32] (the config wants [64])"),
    # transformers 4.57 would add the prefix back; edgeq.decoder reads the names as they are, so refused up front
    (_strip_prefix, "20 missing: model.embed_tokens.weight,"),
], ids=["missing", "unexpected-bias", "reshaped", "no-model-prefix"])
def test_a_mismatch_is_refused_by_name(tiny_dir, tmp_path, change, expected):
    folder = rewritten(tiny_dir, tmp_path, change)
    with pytest.raises(ModelFolderError) as err:
        check_complete(inspect_model_dir(folder))
    assert f"the weights in {folder} do not match its config (LlamaForCausalLM, 21 tensors): " in err.value.message
    assert expected in err.value.message
    assert "never fills missing weights at random" in err.value.hint


def test_biases_the_config_asks_for_are_expected(tmp_path):
    """attention_bias and mlp_bias: a bias on every linear, which the architecture has and the builder reads."""
    folder = tiny_family("llama", tmp_path / "bias", extra=dict(attention_bias=True, mlp_bias=True))
    assert Q_BIAS in load_file(folder / "model.safetensors")
    check_complete(inspect_model_dir(folder))
