"""The decoder graph against transformers' own forward on tiny random checkpoints of each family.

Tolerance: the largest |logit difference| measured over these prompts and families was 1.8e-5, at most 1.2e-6 of
the prompt's max |logit|; the tests allow 1e-5 of max |logit|, ~10x that (FP32 on both sides, only the order of
summation differs).
"""

from __future__ import annotations

import dataclasses
import gc
import io
import json
import weakref

import numpy as np
import onnx
import pytest

from edgeq.decoder.graph import (QuantizedLinear, embed, embedding_table, final_norm_weight, head_logits, head_model,
                                 head_weight, layer_model, write_decoder)
from edgeq.decoder.layers import layer_weights
from edgeq.decoder.spec import decoder_spec
from edgeq.decoder.weights import open_safetensors

from .tiny import (CONTEXT, RTOL, VARIANTS, build, copy_tokenizer, decoder_logits, prompts, reference_logits,
                   reference_model, session)

@pytest.fixture(scope="module")
def built(tiny_checkpoints, tmp_path_factory):
    made = {}

    def get(variant):
        if variant not in made:
            folder = tiny_checkpoints(variant)
            made[variant] = (folder, *build(folder, tmp_path_factory.mktemp(f"dec_{variant}")))
        return made[variant]

    return get


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decoder_matches_transformers(built, variant):
    folder, spec, _, path = built(variant)
    sess, model = session(str(path)), reference_model(folder)
    for ids in prompts(spec.vocab):
        ref = reference_logits(model, ids)
        got = decoder_logits(spec, sess, ids)
        assert np.abs(got - ref).max() <= RTOL * np.abs(ref).max(), (variant, ids.shape)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_layer_chain_matches_decoder(built, variant):
    """embed -> layer_model per layer -> head_model gives the full decoder's logits (what layerwise runs)."""
    _, spec, src, path = built(variant)
    full_session = session(str(path))
    table = embedding_table(src)
    layers = [session(layer_model(spec, i, layer_weights(spec, src, i), taps=True))
              for i in range(spec.num_layers)]
    head = session(head_model(spec, final_norm_weight(spec, src), head_weight(spec, src)))
    for ids in prompts(spec.vocab):
        hidden = embed(spec, table, ids)
        for layer in layers:
            out = layer.run(None, {"hidden_states": hidden, "attention_mask": np.ones_like(ids)})
            names = [o.name for o in layer.get_outputs()]
            taps = dict(zip(names, out))
            assert taps["tap/qkv"].shape == (1, ids.shape[1], spec.hidden)
            assert taps["tap/down"].shape == (1, ids.shape[1], spec.intermediate)
            hidden = taps["hidden_states_out"]
        logits = head.run(["logits"], {"hidden_states": hidden})[0]
        full = decoder_logits(spec, full_session, ids)
        assert np.abs(logits - full).max() <= RTOL * np.abs(full).max()


def test_layer_model_batches_right_padded_rows(built):
    """A batch of two prompts, the shorter padded on the right, gives each row what it gives alone."""
    _, spec, src, _ = built("gemma3_text")
    layer = session(layer_model(spec, 0, layer_weights(spec, src, 0)))
    long, short = prompts(spec.vocab)[2], prompts(spec.vocab)[1]
    alone = [layer.run(None, {"hidden_states": embed(spec, src, ids), "attention_mask": np.ones_like(ids)})[0]
             for ids in (long, short)]
    pad = long.shape[1] - short.shape[1]
    hidden = np.concatenate([embed(spec, src, long), np.pad(embed(spec, src, short), ((0, 0), (0, pad), (0, 0)))])
    mask = np.ones((2, long.shape[1]), np.int64)
    mask[1, short.shape[1]:] = 0
    batch = layer.run(None, {"hidden_states": hidden, "attention_mask": mask})[0]
    np.testing.assert_allclose(batch[0], alone[0][0], atol=1e-6)
    np.testing.assert_allclose(batch[1, :short.shape[1]], alone[1][0], atol=1e-6)


@pytest.mark.parametrize("variant", ["llama", "gemma3_softcap"])
def test_head_logits_matches_head_model(built, variant):
    """The numpy head (for heads over protobuf's 2 GB) computes what head_model does, soft-cap included."""
    _, spec, src, _ = built(variant)
    norm, weight = final_norm_weight(spec, src), head_weight(spec, src)
    hidden = np.random.default_rng(0).normal(0, 1, (2, 7, spec.hidden)).astype(np.float32)
    want = session(head_model(spec, norm, weight)).run(["logits"], {"hidden_states": hidden})[0]
    got = head_logits(spec, norm, weight, hidden, vocab_block=100)
    assert np.abs(got - want).max() <= RTOL * np.abs(want).max()


def test_head_over_two_gigabytes_is_refused(built):
    from edgeq.errors import EdgeqError

    _, spec, src, _ = built("llama")
    huge = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (spec.hidden, 2**31 // 4 // spec.hidden + 1),
                                           (0, 0))  # 2 GiB of shape, no memory
    with pytest.raises(EdgeqError, match=r"FP32 lm_head \(2.0 GiB\) does not fit one ONNX model proto"):
        head_model(spec, final_norm_weight(spec, src), huge)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_genai_greedy_matches_transformers(built, variant):
    import onnxruntime_genai as og
    import torch

    folder, spec, _, path = built(variant)
    copy_tokenizer(folder, path.parent)
    model = og.Model(str(path.parent))
    reference = reference_model(folder)
    for ids in prompts(spec.vocab)[1:]:
        params = og.GeneratorParams(model)
        # EOS is held off for 16 tokens on both sides: random weights may pick it at once
        params.set_search_options(do_sample=False, max_length=ids.shape[1] + 16, min_length=ids.shape[1] + 16)
        generator = og.Generator(model, params)
        generator.append_tokens(ids[0].tolist())
        while not generator.is_done():
            generator.generate_next_token()
        got = [int(t) for t in generator.get_sequence(0)]
        with torch.no_grad():
            want = reference.generate(torch.from_numpy(ids), attention_mask=torch.ones_like(torch.from_numpy(ids)),
                                      max_new_tokens=16, min_new_tokens=16, do_sample=False)[0].tolist()
        assert got == want and len(got) == ids.shape[1] + 16, variant


def test_write_decoder_is_reproducible(tiny_checkpoints, tmp_path):
    folder = tiny_checkpoints("gemma3_text")
    outs = [build(folder, tmp_path / name)[2].parent for name in ("a", "b")]
    for name in ("model.onnx", "model.onnx.data", "genai_config.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_large_tensors_are_aligned_for_mapping(built):
    from edgeq.decoder.graph import BIG, PAGE

    _, _, _, path = built("llama")
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        entries = {e.key: int(e.value) for e in t.external_data if e.key in ("offset", "length")}
        assert entries, t.name  # every weight lives in model.onnx.data
        assert entries["offset"] % (PAGE if entries["length"] >= BIG else 64) == 0, t.name


@pytest.mark.parametrize("variant, context", [("phi4mini", 65), ("llama", 257)])
def test_context_beyond_the_model_is_refused(tiny_checkpoints, tmp_path, variant, context):
    """Past a LongRoPE model's original length transformers switches to the long factors mid-generation, which one
    rotary table cannot follow; past max_position_embeddings there are no positions."""
    from edgeq.errors import UserInputError

    folder = tiny_checkpoints(variant)
    spec = decoder_spec(json.loads((folder / "config.json").read_text()))
    with pytest.raises(UserInputError, match=f"context length {context} is outside 1..{context - 1}"):
        write_decoder(spec, tmp_path, np.zeros((spec.vocab, spec.hidden), np.float32), [],
                      np.ones(spec.hidden, np.float32), context_length=context)
    assert not (tmp_path / "model.onnx").exists()


def _quantized(w, symmetric, accuracy_level):
    from edgeq.llm.int4 import pack_matmulnbits, quantize_rtn

    bq = quantize_rtn(w, 32, symmetric)
    b, scales, zp = pack_matmulnbits(bq)
    return QuantizedLinear(b, scales, zp, w.shape[0], w.shape[1], 4, 32, accuracy_level), bq.dequantize()


@pytest.mark.parametrize("symmetric", [True, False])
def test_quantized_layer_matches_its_dequantized_weights(tiny_checkpoints, symmetric):
    """MatMulNBits roles (accuracy_level 0: FP32 arithmetic) compute what MatMul does with the dequantized weights."""
    folder = tiny_checkpoints("qwen2")
    spec = decoder_spec(json.loads((folder / "config.json").read_text()))
    w = layer_weights(spec, open_safetensors(folder), 0)
    pairs = {role: _quantized(np.asarray(x), symmetric, 0) for role, x in w.linears.items()}
    quant = dataclasses.replace(w, linears={r: q for r, (q, _) in pairs.items()})
    dequant = dataclasses.replace(w, linears={r: d for r, (_, d) in pairs.items()})
    ids = prompts(spec.vocab)[2]
    feed = {"hidden_states": embed(spec, open_safetensors(folder), ids), "attention_mask": np.ones_like(ids)}
    got = session(layer_model(spec, 0, quant)).run(None, feed)[0]
    want = session(layer_model(spec, 0, dequant)).run(None, feed)[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_quantized_decoder_generates_through_genai(tiny_checkpoints, tmp_path):
    """A decoder of MatMulNBits layers and head (accuracy_level 4, as packages use) loads and generates."""
    import onnxruntime_genai as og

    folder = tiny_checkpoints("llama")
    spec = decoder_spec(json.loads((folder / "config.json").read_text()))
    src = open_safetensors(folder)

    def layers():
        for i in range(spec.num_layers):
            w = layer_weights(spec, src, i)
            yield dataclasses.replace(w, linears={r: _quantized(np.asarray(x), False, 4)[0]
                                                  for r, x in w.linears.items()})

    head = _quantized(head_weight(spec, src), False, 4)[0]
    path = write_decoder(spec, tmp_path, embedding_table(src).astype(np.float16), layers(),
                         final_norm_weight(spec, src), head, context_length=CONTEXT)
    copy_tokenizer(folder, tmp_path)
    model = og.Model(str(tmp_path))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=21, min_length=21)
    generator = og.Generator(model, params)
    generator.append_tokens(prompts(spec.vocab)[1][0].tolist())
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == 21
    ops = {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops and "MatMul" not in ops and "Cast" in ops  # FP16 table: Gather then Cast


def test_write_decoder_streams_layer_by_layer(tiny_checkpoints, tmp_path):
    """Each layer's tensors are in model.onnx.data before the next layer is asked for: the builder keeps none."""
    folder = tiny_checkpoints("qwen3")
    spec = decoder_spec(json.loads((folder / "config.json").read_text()))
    src = open_safetensors(folder)
    sizes = []

    def layers():
        for i in range(spec.num_layers):
            data = tmp_path / "model.onnx.data"
            sizes.append(data.stat().st_size)
            yield layer_weights(spec, src, i)
        sizes.append((tmp_path / "model.onnx.data").stat().st_size)

    write_decoder(spec, tmp_path, embedding_table(src), layers(), final_norm_weight(spec, src), context_length=CONTEXT)
    layer_bytes = sum(w.nbytes for w in layer_weights(spec, src, 0).linears.values())
    # the file's size trails what was written by at most one write buffer
    assert all(b - a >= layer_bytes - io.DEFAULT_BUFFER_SIZE for a, b in zip(sizes[1:], sizes[2:])), sizes


def test_write_decoder_keeps_no_quantized_layer_once_written(tiny_checkpoints, tmp_path):
    """A quantized layer is freed once written: the builder held every layer's codes (an 8B export grew 0.15 GB per
    layer in its quantize stage). The sharing it held them for, a tied head on an 8-bit table's codes, is
    test_an_8_bit_table_is_gathered_as_its_float_values."""
    folder = tiny_checkpoints("llama")
    spec = decoder_spec(json.loads((folder / "config.json").read_text()))
    src = open_safetensors(folder)
    alive = []  # at each request, the earlier layers' quantized linears still reachable

    def layers():
        refs = []
        for i in range(spec.num_layers):
            gc.collect()
            alive.append(sum(r() is not None for r in refs))
            w = layer_weights(spec, src, i)
            linears = {r: _quantized(np.asarray(x), False, 4)[0] for r, x in w.linears.items()}
            refs += [weakref.ref(q) for q in linears.values()]
            yield dataclasses.replace(w, linears=linears)
            del w
            del linears

    write_decoder(spec, tmp_path, embedding_table(src).astype(np.float16), layers(), final_norm_weight(spec, src),
                  _quantized(head_weight(spec, src), False, 4)[0], context_length=CONTEXT)
    assert spec.num_layers >= 2 and alive == [0] * spec.num_layers


def test_partition_report_reads_shapes_not_weights(tiny_checkpoints, tmp_path, monkeypatch):
    # the report of a written decoder is ORT's own (ModelProtoWithShapeInfo loads every weight) without the weights
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo

    from edgeq import partitions

    _, _, path = build(tiny_checkpoints("gemma3_text"), tmp_path)
    small = partitions._shape_inferred(path)
    assert any(t.dims and not t.raw_data for t in small.graph.initializer)  # the weights were not read
    report = partitions.partition_report(path, partitions.PARTITION_EPS)
    monkeypatch.setattr(partitions, "_shape_inferred", lambda p: ModelProtoWithShapeInfo(p).model_with_shape_info)
    assert report == partitions.partition_report(path, partitions.PARTITION_EPS)


def _table_8bit(table, symmetric):
    """An 8-bit table as MatMulNBits stores a [hidden, vocab] weight (accuracy_level 0: FP32 arithmetic), and the
    float table it stands for."""
    from edgeq.llm.int4 import pack_matmulnbits, quantize_rtn

    bq = quantize_rtn(np.ascontiguousarray(table.T), 32, symmetric, bits=8)
    b, scales, zp = pack_matmulnbits(bq)
    return QuantizedLinear(b, scales, zp, table.shape[1], table.shape[0], 8, 32, 0), bq.dequantize().T.copy()


@pytest.mark.parametrize("variant, symmetric", [("llama", False), ("llama", True), ("llama3", False)])
def test_an_8_bit_table_is_gathered_as_its_float_values(tiny_checkpoints, tmp_path, variant, symmetric):
    """GatherBlockQuantized over an 8-bit table gives the logits of the same decoder on the dequantized table (FP32
    arithmetic: within the file's 1e-5 of max |logit|); a tied head reads the table's own codes: one copy of them in
    the file and no float table."""
    folder = tiny_checkpoints(variant)
    spec = decoder_spec(json.loads((folder / "config.json").read_text()))
    src = open_safetensors(folder)
    table, floats = _table_8bit(embedding_table(src), symmetric)
    layers = [layer_weights(spec, src, i) for i in range(spec.num_layers)]
    head = table if spec.tied else head_weight(spec, src)
    got = write_decoder(spec, tmp_path / "q", table, iter(layers), final_norm_weight(spec, src), head,
                        context_length=CONTEXT)
    want = write_decoder(spec, tmp_path / "f", floats, iter(layers), final_norm_weight(spec, src),
                         floats.T.copy() if spec.tied else head, context_length=CONTEXT)
    for ids in prompts(spec.vocab):
        a, b = decoder_logits(spec, session(str(got)), ids), decoder_logits(spec, session(str(want)), ids)
        assert np.abs(a - b).max() <= RTOL * np.abs(b).max()
    graph = onnx.load(str(got), load_external_data=False).graph
    codes = [i for i in graph.initializer if i.name.endswith("weight_Q8")]
    assert [i.name for i in codes] == ["lm_head.weight_Q8" if spec.tied else "model.embed_tokens.weight_Q8"]
    assert not [i for i in graph.initializer if i.name == "model.embed_tokens.weight"]
    readers = [n.op_type for n in graph.node if codes[0].name in n.input]
    assert readers == (["GatherBlockQuantized", "MatMulNBits"] if spec.tied else ["GatherBlockQuantized"])
