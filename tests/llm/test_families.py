"""Every supported causal-LM family of edgeq.families through the android-arm64 recipe, on tiny random models
(tests/llm/tiny_families.py: 2 layers, hidden 64, 4 query / 2 KV heads, vocabulary 600): built layer by layer by
edgeq.decoder, INT4 with the K/V projections at 8 bits, packaged for onnxruntime-genai, and near torch's FP32.

The FP32 graph's exactness per family (logits within 1e-5 of max |logit| of transformers', greedy tokens equal
through onnxruntime-genai) is tests/decoder/test_graph.py's; here the whole export is. A 64-wide random model with
std 0.2 weights is 4-bit's worst case: rel = max |INT4 - torch| / max |torch| measured 0.18-0.33 with mean cosine
0.970-0.989 over the families (onnxruntime 1.32, x86; gemma3_text the closest, phi3 the farthest); the bounds below
(rel 0.4, cos 0.96) leave a fifth to a third of that as margin, and a broken graph (a wrong KV layout or packing)
gives rel > 1. SmolLM2's slow test carries the real bar.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeq.errors import UnsupportedModelError, UserInputError
from edgeq.families import CAUSAL_LM, FAMILIES, by_model_type
from edgeq.llm.genai import GENAI_CONFIG, DecoderIO, genai_config, greedy_tokens
from edgeq.pipeline import ExportRequest, export_package
from edgeq.runtime import session

from .test_genai import chat_ids
from .tiny_families import FAMILIES as TINY
from .tiny_families import tiny_family

SUPPORTED = sorted(t for f in FAMILIES if f.kind == CAUSAL_LM and f.supported for t in f.model_types)
REFUSED = sorted(t for f in FAMILIES if f.kind == CAUSAL_LM and not f.supported for t in f.model_types)


def test_every_claimed_family_is_tested():
    """A tiny model of every supported model type, and of Gemma-2 for its refusal (the multimodal gemma3 type is
    refused by its registry entry before any file is read: tests/test_families.py)."""
    assert set(TINY) == set(SUPPORTED) | {"gemma2"} and REFUSED == ["gemma2", "gemma3"]


def test_gemma2_is_refused_up_front(tmp_path):
    src = tiny_family("gemma2", tmp_path / "src")
    with pytest.raises(UnsupportedModelError, match="soft-capping") as exc:
        export_package(ExportRequest(src, "android-arm64", out_dir=tmp_path / "out"))
    assert "Gemma-3" in exc.value.hint
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_sliding_window_is_no_cap_but_short_rope_is():
    """The graph applies a sliding window itself (GroupQueryAttention's local_window_size), so a context past it
    is fine; LongRoPE's short factors are all the package holds, so past original_max_position_embeddings is not."""
    config = {"model_type": "mistral", "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64,
              "num_hidden_layers": 2, "vocab_size": 600, "eos_token_id": 2, "sliding_window": 64}
    io = DecoderIO(2, 2, 16, False, True)
    assert genai_config("m.onnx", io, config, None, context_length=128)["model"]["type"] == "mistral"
    phi = config | {"model_type": "phi3", "sliding_window": None, "original_max_position_embeddings": 64,
                    "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}
    with pytest.raises(UserInputError, match="LongRoPE"):
        genai_config("m.onnx", io, phi, None, context_length=65)


class Family:
    def __init__(self, model_type: str, root):
        self.model_type = model_type
        self.src = tiny_family(model_type, root / "src")
        self.config = json.loads((self.src / "config.json").read_text())
        settings = (("llm.window_tokens", 128), ("llm.context_length", 128), ("llm.max_ppl_increase", 1.0),
                    ("llm.min_top1_agreement", 0.0))
        self.package = export_package(ExportRequest(self.src, "android-arm64", out_dir=root / "out",
                                                    settings=settings))


@pytest.fixture(scope="module", params=SUPPORTED)
def family(request, tmp_path_factory) -> Family:
    return Family(request.param, tmp_path_factory.mktemp(request.param))


def test_package_is_built_fused_with_kv_at_8_bits(family):
    m = family.package.manifest
    layers = family.config["num_hidden_layers"]
    assert f"{layers} GroupQueryAttention" in m["model"]["fusions"]
    kv_nodes = [d for d in m["precision"]["nodes"] if "K/V projection" in d["reason"]]
    assert len(kv_nodes) == layers and {d["precision"] for d in kv_nodes} == {"int8"}
    config = json.loads((family.package.path / GENAI_CONFIG).read_text())
    assert config["model"]["type"] == by_model_type(family.model_type).runtime_type
    assert config["search"]["past_present_share_buffer"] is True  # every layer's cache is a GroupQueryAttention's
    tokens = greedy_tokens(family.package.path, chat_ids(family.src), 8)
    assert len(tokens) >= 1 and all(0 <= t < family.config["vocab_size"] for t in tokens)


def test_int4_package_near_fp32(family):
    import torch
    from transformers import AutoModelForCausalLM

    from edgeq.llm.evaluate import window_feeds

    ids = np.arange(5, 69, dtype=np.int64) % 600
    sess = session(family.package.path / "model.onnx")
    got = sess.run(["logits"], window_feeds(sess, ids))[0][0]
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(family.src, attn_implementation="eager").eval()
        ref = model(torch.from_numpy(ids)[None]).logits[0].numpy()
    rel = np.abs(got - ref).max() / np.abs(ref).max()
    cos = ((got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)).mean()
    assert rel <= 0.4 and cos >= 0.96, (rel, cos)
