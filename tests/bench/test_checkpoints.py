"""bench/checkpoints.py: random BF16 checkpoints that transformers loads with the right shapes, byte-reproducible."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from checkpoints import CONFIGS, MAX_SHARD_BYTES, parameter_count, shard_plan, tensors, write_checkpoint  # noqa: E402

TINY_LLAMA = CONFIGS["llama-3.1-8b"] | {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                                        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                                        "vocab_size": 300, "tie_word_embeddings": False}
TINY_QWEN = CONFIGS["qwen2.5-3b"] | {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                                     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300,
                                     "max_window_layers": 2}
SHARD = 40_000  # bytes: splits TINY_LLAMA's ~150 kB into several shards


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("config, shard", [(TINY_LLAMA, SHARD), (TINY_QWEN, None)], ids=["llama-sharded", "qwen2"])
def test_transformers_loads_the_checkpoint_with_every_shape_in_bf16(tmp_path, config, shard):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    folder = write_checkpoint(tmp_path / "ckpt", config, seed=0, max_shard_bytes=shard)
    if shard:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        files = sorted(set(index["weight_map"].values()))
        assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
        assert index["metadata"]["total_size"] == 2 * parameter_count(config)
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "np") as st:
            assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"BF16"}
    model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True, dtype="auto")
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert model.dtype == torch.bfloat16  # the config's torch_dtype, as the published models load with "auto"
    expected = {t.name: t.shape for t in tensors(config)}
    assert {n: tuple(p.shape) for n, p in model.state_dict().items() if n in expected} == expected
    q = model.model.layers[0].self_attn.q_proj.weight.float()
    assert abs(q.std().item() - 0.02) < 0.002 and torch.all(model.model.norm.weight == 1)


def test_the_same_seed_writes_the_same_bytes(tmp_path):
    a = _digest(write_checkpoint(tmp_path / "a", TINY_LLAMA, seed=3, max_shard_bytes=SHARD))
    b = _digest(write_checkpoint(tmp_path / "b", TINY_LLAMA, seed=3, max_shard_bytes=SHARD))
    c = _digest(write_checkpoint(tmp_path / "c", TINY_LLAMA, seed=4, max_shard_bytes=SHARD))
    assert a == b
    shards = [n for n in a if n.endswith(".safetensors")]
    assert len(shards) > 2 and a["config.json"] == c["config.json"] and all(a[n] != c[n] for n in shards)


def test_a_tensors_bytes_do_not_depend_on_the_shard_plan(tmp_path):
    import torch
    from safetensors.torch import load_file

    sharded = write_checkpoint(tmp_path / "sharded", TINY_LLAMA, seed=0, max_shard_bytes=SHARD)
    single = load_file(str(write_checkpoint(tmp_path / "single", TINY_LLAMA, seed=0) / "model.safetensors"))
    split = {k: v for f in sorted(sharded.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert split.keys() == single.keys() and all(torch.equal(split[k], single[k]) for k in single)


@pytest.mark.parametrize("name, published", [("llama-3.2-1b", 1_235_814_400), ("qwen2.5-3b", 3_085_938_688),
                                             ("llama-3.1-8b", 8_030_261_248)])
def test_the_real_configs_have_transformers_shapes_and_the_published_sizes(name, published):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = CONFIGS[name]
    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    expected = {n: tuple(p.shape) for n, p in model.state_dict().items() if not n.endswith("rotary_emb.inv_freq")}
    if config["tie_word_embeddings"]:
        expected.pop("lm_head.weight")
    assert {t.name: t.shape for t in tensors(config)} == expected
    assert parameter_count(config) == published  # the parameter counts the model cards give
    sizes = [sum(t.nbytes for t in s) for s in shard_plan(tensors(config), MAX_SHARD_BYTES[name])]
    assert len(sizes) == {"llama-3.2-1b": 1, "qwen2.5-3b": 2, "llama-3.1-8b": 4}[name]  # the upstream file counts
