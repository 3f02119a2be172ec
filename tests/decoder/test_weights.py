"""open_safetensors: one file or shards, F32/BF16, one tensor at a time; refusals of broken folders."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeq.decoder.layers import layer_weights
from edgeq.decoder.spec import decoder_spec
from edgeq.decoder.weights import TensorSource, open_safetensors
from edgeq.errors import ModelFolderError, UnsupportedModelError

from .tiny import CONTEXT, RTOL, build, decoder_logits, prompts, reference_logits, reference_model, session


@pytest.fixture(scope="module")
def sharded_bf16(tiny_checkpoints, tmp_path_factory):
    """The tiny Qwen2 (biases too) re-saved in BF16 across several shards with an index."""
    import torch

    folder = tmp_path_factory.mktemp("sharded_bf16")
    model = reference_model(tiny_checkpoints("qwen2")).to(torch.bfloat16)
    model.save_pretrained(str(folder), max_shard_size="60KB")
    return folder, model


def test_sharded_bf16_tensors_are_exact(sharded_bf16):
    folder, model = sharded_bf16
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 2
    source = open_safetensors(folder)
    assert isinstance(source, TensorSource)
    params = {k: v.float().numpy() for k, v in model.state_dict().items()}
    assert set(source.keys()) == set(params) - {"lm_head.weight"}  # tied: saved once
    for name in source.keys():
        got = source.get(name)
        assert got.dtype == np.float32 and source.shape(name) == got.shape
        np.testing.assert_array_equal(got, params[name])  # BF16 -> FP32 is exact


def test_sharded_bf16_decoder_matches_transformers(sharded_bf16, tmp_path):
    folder, _ = sharded_bf16
    spec, _, path = build(folder, tmp_path)
    sess, reference = session(str(path)), reference_model(folder)  # loaded as float32: the same BF16 values
    for ids in prompts(spec.vocab):
        ref = reference_logits(reference, ids)
        assert np.abs(decoder_logits(spec, sess, ids) - ref).max() <= RTOL * np.abs(ref).max()
    assert CONTEXT == json.loads((path.parent / "genai_config.json").read_text())["model"]["context_length"]


def test_missing_shard_is_refused(sharded_bf16, tmp_path):
    folder, _ = sharded_bf16
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    for f in folder.iterdir():
        if f.name != shard:
            (tmp_path / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ModelFolderError, match=f"names shard '{shard}', which is not a file"):
        open_safetensors(tmp_path)


def test_index_naming_a_path_outside_is_refused(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../x.safetensors"}}))
    with pytest.raises(ModelFolderError, match="names shard '../x.safetensors'"):
        open_safetensors(tmp_path)


def test_folder_without_safetensors_is_refused(tmp_path):
    with pytest.raises(ModelFolderError, match="has neither model.safetensors nor model.safetensors.index.json"):
        open_safetensors(tmp_path)


def test_integer_tensor_is_refused(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.zeros((2, 2), np.int8)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UnsupportedModelError, match="tensor w is stored as I8, not BF16/F16/F32"):
        open_safetensors(tmp_path).get("w")


def test_missing_layer_tensor_is_refused(tiny_checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = tiny_checkpoints("llama")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    spec = decoder_spec(json.loads((folder / "config.json").read_text()))
    with pytest.raises(ModelFolderError, match="no tensor model.layers.1.mlp.up_proj.weight"):
        layer_weights(spec, open_safetensors(tmp_path), 1)


def test_fp16_tensors_widen_exactly(tiny_checkpoints, tmp_path):
    import torch

    model = reference_model(tiny_checkpoints("llama")).to(torch.float16)
    model.save_pretrained(str(tmp_path))
    source = open_safetensors(tmp_path)
    for name, value in model.state_dict().items():
        if name in source.keys():
            np.testing.assert_array_equal(source.get(name), value.float().numpy())
