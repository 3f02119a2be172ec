"""FuseLLM on a tiny random Llama exported by optimum: the expected fused ops, and the same logits and KV cache.

Tolerance (the one the pass's docs state): over a prefill and 8 decode steps, max |fused - unfused| logits at most
3e-5 of the largest |logit|, and the same argmax at every position. Measured: 1.7e-6 relative here (1.0e-5
absolute, logits up to 6.3), 2.5e-6 on SmolLM2-135M (8.0e-5 absolute, logits up to 32). The greedy tokens
onnxruntime-genai produces from the fused package must equal the unfused package's.
"""

from __future__ import annotations

import collections
import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgeq.passes.fuse_llm import FuseLLM

LAYERS, HEADS, KV_HEADS, HIDDEN, VOCAB = 2, 4, 2, 64, 256
HEAD = HIDDEN // HEADS
REL_TOL = 3e-5
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_llama_onnx(tmp_path_factory) -> Path:
    """optimum text-generation-with-past export of a 2-layer random Llama (GQA 4/2 heads, tied embeddings)."""
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("fuse-llm")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128,
                      tie_word_embeddings=True, rms_norm_eps=1e-5, initializer_range=0.2, bos_token_id=1,
                      eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms initialise to ones (and the exporter then shares one tensor): make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    model.save_pretrained(root / "hf", safe_serialization=True)
    main_export(str(root / "hf"), output=root / "onnx", task="text-generation-with-past", do_validation=False)
    return root / "onnx"


@pytest.fixture(scope="module")
def fused(tiny_llama_onnx):
    model = onnx.load(str(tiny_llama_onnx / "model.onnx"))
    fuse = FuseLLM(max_positions=128)
    return model, fuse(model), fuse


def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _decode(model: onnx.ModelProto, ids: list[int], prompt: int) -> list[dict[str, np.ndarray]]:
    """Outputs of a prefill over ``ids[:prompt]`` then one step per remaining id, feeding present back as past."""
    sess = _session(model)
    names = {i.name for i in sess.get_inputs()}
    out_names = [o.name for o in sess.get_outputs()]
    past = {f"past_key_values.{l}.{kv}": np.zeros((1, KV_HEADS, 0, HEAD), np.float32)
            for l in range(LAYERS) for kv in ("key", "value")}
    steps, pos = [], 0
    for chunk in [ids[:prompt]] + [[t] for t in ids[prompt:]]:
        feed = {"input_ids": np.array([chunk], np.int64), "attention_mask": np.ones((1, pos + len(chunk)), np.int64),
                "position_ids": np.arange(pos, pos + len(chunk), dtype=np.int64)[None], **past}
        out = dict(zip(out_names, sess.run(None, {k: v for k, v in feed.items() if k in names})))
        past = {k.replace("present", "past_key_values"): v for k, v in out.items() if k.startswith("present")}
        steps.append(out)
        pos += len(chunk)
    return steps


@pytest.mark.encoders
def test_fuses_expected_ops(fused):
    original, result, fuse = fused
    assert result.modified
    assert fuse.counts["GroupQueryAttention"] == LAYERS
    assert fuse.counts["packed QKV MatMul"] == LAYERS
    assert fuse.counts["SimplifiedLayerNormalization"] == 1  # layer 0's input norm reads the embedding
    assert fuse.counts["SkipSimplifiedLayerNormalization"] == 2 * LAYERS  # residual + norm, the final norm too
    assert fuse.counts["lm_head untied"] == 1
    assert not fuse.unfused
    ops = collections.Counter(n.op_type for n in result.model.graph.node)
    assert ops["GroupQueryAttention"] == LAYERS and ops["SkipSimplifiedLayerNormalization"] == 2 * LAYERS
    for gone in ("Softmax", "Pow", "ReduceMean", "Sqrt", "Neg", "Slice", "Expand", "Where", "Transpose", "Range"):
        assert ops[gone] == 0, gone
    # 7 projections become 5 MatMuls per layer (packed q/k/v), plus the head.
    assert ops["MatMul"] == 5 * LAYERS + 1
    assert len(result.model.graph.node) < len(original.graph.node) / 10
    gqa = next(n for n in result.model.graph.node if n.op_type == "GroupQueryAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa.attribute}
    assert (attrs["num_heads"], attrs["kv_num_heads"], attrs["do_rotary"]) == (HEADS, KV_HEADS, 1)
    assert attrs["scale"] == pytest.approx(HEAD ** -0.5)
    assert gqa.domain == "com.microsoft"
    assert list(gqa.output[1:]) == ["present.0.key", "present.0.value"]
    # GroupQueryAttention derives positions from attention_mask: position_ids is no longer an input.
    assert [i.name for i in result.model.graph.input][:2] == ["input_ids", "attention_mask"]
    assert "position_ids" not in {i.name for i in result.model.graph.input}
    assert {o.name for o in result.model.graph.output} == {o.name for o in original.graph.output}
    assert "nodes" in result.summary and "GroupQueryAttention: 2" in result.summary
    assert len(original.graph.node) > 500  # the input was not touched (passes work on a copy)


@pytest.mark.encoders
def test_logits_and_cache_match_unfused(fused):
    original, result, _ = fused
    ids = np.random.default_rng(0).integers(3, VOCAB, 20).tolist()
    ref, got = _decode(original, ids, prompt=12), _decode(result.model, ids, prompt=12)
    assert len(ref) == 9  # prefill + 8 decode steps
    scale = max(np.abs(r["logits"]).max() for r in ref)
    for r, g in zip(ref, got):
        assert r["logits"].shape == g["logits"].shape
        assert np.abs(r["logits"] - g["logits"]).max() <= REL_TOL * scale
        assert (r["logits"].argmax(-1) == g["logits"].argmax(-1)).all()
        for name in r:
            if name.startswith("present"):
                assert r[name].shape == g[name].shape
                np.testing.assert_allclose(g[name], r[name], rtol=0, atol=REL_TOL * max(1.0, np.abs(r[name]).max()))


@pytest.mark.encoders
def test_unpacked_qkv_matches_too(tiny_llama_onnx):
    """pack_qkv=False: GroupQueryAttention reads the three projections; same logits."""
    original = onnx.load(str(tiny_llama_onnx / "model.onnx"))
    fuse = FuseLLM(max_positions=128, pack_qkv=False)
    result = fuse(original)
    assert fuse.counts["GroupQueryAttention"] == LAYERS and "packed QKV MatMul" not in fuse.counts
    assert collections.Counter(n.op_type for n in result.model.graph.node)["MatMul"] == 7 * LAYERS + 1
    ids = np.random.default_rng(2).integers(3, VOCAB, 14).tolist()
    ref, got = _decode(original, ids, prompt=6), _decode(result.model, ids, prompt=6)
    scale = max(np.abs(r["logits"]).max() for r in ref)
    assert max(np.abs(r["logits"] - g["logits"]).max() for r, g in zip(ref, got)) <= REL_TOL * scale


def test_unfused_model_left_alone():
    """A graph without the pattern: nothing fused, reported as such."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g", [x], [y])
    result = FuseLLM()(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert not result.modified
    assert result.summary.startswith("nothing fused")


def _bench():
    spec = importlib.util.spec_from_file_location("llm_decode", ROOT / "bench" / "llm_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.encoders
def test_genai_greedy_tokens_match(tiny_llama_onnx, tmp_path):
    """onnxruntime-genai drives the fused graph (GQA, shared KV buffer) to the unfused graph's greedy tokens."""
    og = pytest.importorskip("onnxruntime_genai")
    bench = _bench()
    plain, fused_pkg = tmp_path / "plain", tmp_path / "fused"
    bench.build_fp32(tiny_llama_onnx, plain, None, 64)
    bench.build_fused(tiny_llama_onnx, fused_pkg, precision="fp32", context_length=64)
    config = json.loads((fused_pkg / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True
    assert "position_ids" not in config["model"]["decoder"]["inputs"]
    prompt = np.random.default_rng(1).integers(3, VOCAB, 10).tolist()

    def greedy(package: Path) -> list[int]:
        model = og.Model(str(package))
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + 16, min_length=len(prompt) + 16)
        gen = og.Generator(model, params)
        gen.append_tokens(prompt)
        out = []
        while not gen.is_done():
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
        return out

    plain_tokens = greedy(plain)
    assert len(plain_tokens) == 16
    assert greedy(fused_pkg) == plain_tokens
