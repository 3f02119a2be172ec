"""Layer by layer against transformers: the statistics, the reference and the quantized package that
edgeq.decoder.layerwise computes one decoder layer at a time, checked against the same checkpoint's torch forward
(tiny Llama-3: 2 layers, hidden 64, untied head, so the head is a planned linear layer too).

Measured here (tolerances ~10x that): the head's input Hessian agrees with the one from transformers' activations
to 1.4e-7 of its largest entry and each layer's INT4 sensitivity to 3.7e-8 relative (FP32 sums in another order);
the reference log-probabilities to 1.1e-5; the INT4 package (accuracy_level 0: FP32 compute) agrees with
transformers running the package's own dequantized weights to 1.5e-6 of max |logit|, while it differs from FP32 by
0.19-0.37 of max |logit|: the package computes exactly its quantized weights, not merely a similar model.
"""

from __future__ import annotations

import copy
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgeq.decoder import layerwise as L
from edgeq.decoder.graph import embed, embedding_table, final_norm_weight, write_decoder
from edgeq.decoder.weights import open_safetensors
from edgeq.errors import EdgeqError
from edgeq.llm.evaluate import log_softmax, window_logits
from edgeq.llm.int4 import dequantize_matmulnbits, hessian_error, quantize_rtn, sensitivity
from edgeq.policy import Int4Rules, decide_int4
from edgeq.policy.causal_lm import matmulnbits_bytes
from edgeq.runtime import session

from .tiny import build, reference_model

SETTING = "gptq+clip, block 32, asymmetric, accuracy_level 4"
# each role's torch modules under model.layers[i] (q/k/v packed along N as the graph packs them)
TORCH_MODULES = {"qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
                 "gate": ("mlp.gate_proj",), "up": ("mlp.up_proj",), "down": ("mlp.down_proj",)}


def _module(model, path: str):
    for part in path.split("."):
        model = getattr(model, part)
    return model


def _torch_weight(model, i: int | None, role: str):
    """The role's W [K, N] from the torch model (numpy float32)."""
    if i is None:
        return model.lm_head.weight.detach().numpy().T.copy()
    layer = model.model.layers[i]
    return np.concatenate([_module(layer, m).weight.detach().numpy().T for m in TORCH_MODULES[role]], axis=1)


def torch_hessians(model, windows: np.ndarray) -> dict[str, np.ndarray]:
    """sum X^T X (float64) of every linear layer's input over ``windows``, from transformers' FP32 forward."""
    import torch

    sums: dict[str, np.ndarray] = {}

    def hook(name):
        def add(_module, args):
            x = args[0].detach().double().reshape(-1, args[0].shape[-1]).numpy()
            sums[name] = sums.get(name, 0) + x.T @ x
        return add

    handles = [model.lm_head.register_forward_pre_hook(hook(L.linear_name(None, L.HEAD)))]
    for i, layer in enumerate(model.model.layers):
        for role, modules in TORCH_MODULES.items():
            handles.append(_module(layer, modules[0]).register_forward_pre_hook(hook(L.linear_name(i, role))))
    try:
        with torch.no_grad():
            for ids in windows:
                model(torch.from_numpy(np.asarray(ids, np.int64))[None])
    finally:
        for h in handles:
            h.remove()
    return sums


@pytest.fixture(scope="module")
def case(tiny_checkpoints, tmp_path_factory):
    folder = tiny_checkpoints("llama3")
    root = tmp_path_factory.mktemp("layerwise")
    spec, source, fp32 = build(folder, root / "fp32")
    rng = np.random.default_rng(0)
    cal, ev = rng.integers(3, spec.vocab, (4, 32)), rng.integers(3, spec.vocab, (3, 32))
    measured = L.measure(spec, source, cal, ev, context_length=64, block_size=32, symmetric=False,
                         reference_dir=root / "ref")
    model = reference_model(folder)
    return spec, source, fp32, cal, ev, measured, model, torch_hessians(model, cal), root


def test_hessians_and_sensitivities_equal_transformers_activations(case):
    spec, _, _, _, _, measured, model, hessians, _ = case
    head = hessians[L.HEAD]
    np.testing.assert_allclose(measured.head_hessian, head, rtol=0, atol=1.5e-6 * np.abs(head).max())
    assert len(measured.facts.layers) == 5 * spec.num_layers + 1
    for f in measured.facts.layers:
        i = None if f.node == L.HEAD else int(f.node.split(".")[2])
        role = next((r for r in L.ROLES if f.node == L.linear_name(i, r)), L.HEAD)
        w = _torch_weight(model, i, role)
        assert (f.k, f.n) == w.shape, f.node
        assert f.sensitivity == pytest.approx(sensitivity(w, hessians[f.node], 32, False), rel=4e-7), f.node


def test_reference_equals_transformers_log_probabilities(case):
    _, _, _, _, ev, measured, model, _, _ = case
    import torch

    with torch.no_grad():
        for i, ids in enumerate(ev):
            logits = model(torch.from_numpy(np.asarray(ids, np.int64))[None]).logits[0].double().numpy()
            np.testing.assert_allclose(measured.reference.logprobs(i), log_softmax(logits), rtol=0, atol=1e-4)


def _package_weights(path) -> dict[str, tuple[np.ndarray, int, int]]:
    """linear name -> (W [K, N] dequantized from the package's MatMulNBits inputs, bits, bytes stored)."""
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    out = {}
    for node in graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        b, scales, *zp = (inits[n] for n in node.input[1:4] if n)
        w = dequantize_matmulnbits(b, scales, zp[0] if zp else None, attrs["K"], attrs["bits"])
        out[node.name.split("/")[1]] = w, attrs["bits"], sum(inits[n].nbytes for n in node.input[1:4] if n)
    return out


def test_the_package_computes_its_dequantized_weights_and_beats_rtn(case):
    spec, source, fp32, cal, ev, measured, model, hessians, root = case
    rules = Int4Rules(setting=SETTING, promote=1.0, max_linear_bits=6.5)
    plan = {d.node: d for d in decide_int4(measured.facts, rules)}
    assert {d.bits for d in plan.values()} == {4, 8}  # K/V and promoted layers at 8 bits, the rest at 4
    # accuracy_level 0 (FP32 compute): at level 4 the kernel rounds activations to int8 per block, which no torch
    # reference reproduces
    settings = L.QuantSettings(accuracy_level=0)
    layers = L.quantized_layers(spec, source, embed(spec, source, cal), plan, settings, context_length=64)
    path = write_decoder(spec, root / "layerwise", embedding_table(source), layers, final_norm_weight(spec, source),
                         L.quantized_head(spec, source, measured, plan, settings), context_length=64)
    quantized = _package_weights(path)
    assert {name: bits for name, (_, bits, _) in quantized.items()} == {d.node: d.bits for d in plan.values()}
    for name, (w_hat, bits, stored) in quantized.items():
        d = plan[name]
        assert stored == matmulnbits_bytes(d.k, d.n, bits, 32, False), name  # what the size budget counts
        # GPTQ + clip against the FP32 model's own Hessian: below plain RTN's output error at the same bits
        i = None if name == L.HEAD else int(name.split(".")[2])
        role = next((r for r in L.ROLES if name == L.linear_name(i, r)), L.HEAD)
        w, h = _torch_weight(model, i, role), hessians[name]
        assert hessian_error(w, w_hat, h) < hessian_error(w, quantize_rtn(w, 32, False, bits=bits).dequantize(), h)
    import torch

    model = copy.deepcopy(model)  # the module's model stays FP32 for the other tests
    with torch.no_grad():  # transformers with the package's dequantized weights
        for name, (w_hat, _, _) in quantized.items():
            i = None if name == L.HEAD else int(name.split(".")[2])
            role = next((r for r in L.ROLES if name == L.linear_name(i, r)), L.HEAD)
            mods = [model.lm_head] if i is None else [_module(model.model.layers[i], m) for m in TORCH_MODULES[role]]
            cols = np.cumsum([0] + [m.weight.shape[0] for m in mods])
            for m, a, b in zip(mods, cols[:-1], cols[1:]):
                m.weight.copy_(torch.from_numpy(w_hat[:, a:b].T.copy()))
        package, fp = session(path), session(fp32)
        for ids in ev:
            got, ref = window_logits(package, ids), window_logits(fp, ids)
            want = model(torch.from_numpy(np.asarray(ids, np.int64))[None]).logits[0].numpy()
            scale = np.abs(ref).max()
            assert np.abs(got - want).max() <= 1.5e-5 * scale
            assert np.abs(got - ref).max() >= 0.1 * scale  # INT4 is visible: the agreement above is not FP32's


def test_quantizing_refuses_what_matmulnbits_cannot_store(case):
    _, source, _, _, _, _, model, hessians, _ = case
    w, h = _torch_weight(model, 0, "o"), hessians[L.linear_name(0, "o")]
    with pytest.raises(ValueError, match="2 bits planned; MatMulNBits here writes 4 or 8"):
        L.quantize_linear(w, h, 2, L.QuantSettings())
    with pytest.raises(ValueError, match="unknown INT4 method 'awq'"):
        L.QuantSettings(method="awq")
    with pytest.raises(ValueError, match="block_size 48: MatMulNBits needs a power of two >= 16"):
        L.QuantSettings(block_size=48)


def test_a_stored_linear_is_what_pass_2_would_write_again(case):
    """The closest-fix search's candidates (edgeq/stages/remedy.py) reuse the quantized linears of the package
    before them: a plan with more 8-bit layers, written over a store of the default plan's linears, quantizes only
    the layers whose bits changed and is byte for byte the package a fresh pass 2 writes."""
    spec, source, _, cal, _, measured, _, _, root = case
    plans = [{d.node: d for d in decide_int4(measured.facts, Int4Rules(setting=SETTING, promote=promote))}
             for promote in (2.0, 0.5)]
    changed = sum(plans[0][n].bits != plans[1][n].bits for n in plans[0])
    assert changed > 0
    store = L.QuantizedStore(root / "store")

    def write(plan, folder, store):
        return L.write_quantized(spec, source, cal, measured, plan.values(), L.QuantSettings(), root / folder,
                                 embedding_precision="fp16", context_length=64, generation_config=None, store=store)

    write(plans[0], "default", store)
    assert len(store) == len(plans[0])  # every linear is quantized (the head is untied)
    assert not list((root / "store").iterdir())  # read back from the package: no second copy on disk
    reused, fresh = write(plans[1], "reused", store), write(plans[1], "fresh", None)
    assert len(store) == len(plans[0]) + changed
    for name in ("model.onnx", "model.onnx.data"):
        assert (reused.parent / name).read_bytes() == (fresh.parent / name).read_bytes(), name
    # a candidate's folder is deleted after its measurement: the linears only it holds are copied out first
    store.spill(reused.parent)
    assert len(list((root / "store").glob("*.npz"))) == changed
    shutil.rmtree(reused.parent)
    again = write(plans[1], "again", store)
    for name in ("model.onnx", "model.onnx.data"):
        assert (again.parent / name).read_bytes() == (fresh.parent / name).read_bytes(), name
    # pass 1 without evaluation windows: the same facts, no reference
    alone = L.measure(spec, source, cal, None, context_length=64, block_size=32, symmetric=False)
    assert alone.facts == measured.facts and alone.reference is None


@pytest.mark.parametrize("method,symmetric,bits", [("rtn", False, 4), ("gptq", False, 4), ("gptq", True, 8)])
def test_a_wide_linear_quantized_in_column_chunks_is_the_whole_one(monkeypatch, method, symmetric, bits):
    """Each output channel is quantized alone given the Hessian, so a head wider than QUANTIZE_COLUMNS (an 8B
    model's [4096, 128256]) is quantized a chunk of columns at a time into the same MatMulNBits inputs."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 96)).astype(np.float32)
    h = x.T.astype(np.float64) @ x
    w = (rng.standard_normal((96, 50)) * 0.1).astype(np.float32)
    settings = L.QuantSettings(method=method, symmetric=symmetric)
    whole = L.quantize_linear(w, h, bits, settings)
    monkeypatch.setattr(L, "QUANTIZE_COLUMNS", 16)  # 50 columns: 16, 16, 16 and 2
    chunked = L.quantize_linear(w, h, bits, settings)
    assert (chunked.k, chunked.n, chunked.bits) == (whole.k, whole.n, whole.bits)
    np.testing.assert_array_equal(chunked.b, whole.b)
    np.testing.assert_array_equal(chunked.zero_points, whole.zero_points)
    np.testing.assert_allclose(chunked.scales, whole.scales, rtol=1e-6)


def test_chunked_forward_with_the_kv_cache_gives_the_windows_logits(case, monkeypatch):
    """evaluate_lm runs a decoder 128 positions at a time, the KV cache fed back (edgeq.llm.evaluate.logit_chunks):
    the logits are the whole window's. Measured: bit-identical on SmolLM2's package; 1e-5 of max |logit| allowed."""
    from edgeq.llm.evaluate import logit_chunks

    _, _, fp32, _, ev, _, _, _, _ = case
    sess = session(fp32)
    for ids in ev:
        whole = window_logits(sess, ids)
        chunks = list(logit_chunks(sess, ids, run_tokens=12))  # 32 positions: runs of 12, 12 and 8
        assert [(first, len(x)) for first, x in chunks] == [(0, 12), (12, 12), (24, 8)]
        assert np.abs(np.concatenate([x for _, x in chunks]) - whole).max() <= 1e-5 * np.abs(whole).max()
    # evaluate_lm over those runs (rows split across runs and log-softmax chunks) gives the one-run statistics
    import edgeq.llm.evaluate as E

    whole = E.evaluate_lm(sess, sess, ev)
    monkeypatch.setattr(E, "RUN_TOKENS", 12)
    monkeypatch.setattr(E, "CHUNK", 5)
    chunked = E.evaluate_lm(sess, sess, ev)
    assert chunked.tokens == whole.tokens == len(ev) * 31
    assert chunked.perplexity == pytest.approx(whole.perplexity, rel=1e-6)
    assert abs(chunked.mean_kl) < 1e-6 and chunked.top1_agreement == 1.0


@pytest.mark.parametrize("symmetric", [False, True])
def test_an_untied_8_bit_table_is_the_table_rounded_in_row_chunks(tiny_checkpoints, monkeypatch, symmetric):
    """llm.embedding_precision = 'int8' on an untied model: the table quantized on its own, 8 bits per 32-value
    block, each value within one quantization step of its float (the clip search may narrow a block's range);
    rows quantized in chunks give exactly the codes of one pass."""
    table = embedding_table(open_safetensors(tiny_checkpoints("llama3")))
    settings = L.QuantSettings(symmetric=symmetric)
    whole = L.package_embedding(table, "int8", settings, tied=False, head=None)
    monkeypatch.setattr(L, "QUANTIZE_COLUMNS", 64)  # the tiny vocabulary in several chunks
    chunked = L.package_embedding(table, "int8", settings, tied=False, head=None)
    assert (whole.k, whole.n, whole.bits) == (table.shape[1], table.shape[0], 8) and len(table) > 64
    assert all(np.array_equal(a, b) for a, b in [(whole.b, chunked.b), (whole.scales, chunked.scales)])
    assert (whole.zero_points is None) == symmetric
    rows = dequantize_matmulnbits(whole.b, whole.scales, whole.zero_points, whole.k, bits=8).T
    step = np.abs(np.repeat(whole.scales.reshape(len(table), -1), 32, axis=1)[:, :table.shape[1]])
    assert np.all(np.abs(rows - table) <= step * 1.0001)
    assert np.abs(rows - table).mean() < 0.3 * step.mean()
    with pytest.raises(EdgeqError, match="tied head is not planned at 8 bits"):
        L.package_embedding(table, "int8", settings, tied=True, head=None)
    assert L.package_embedding(table, "fp16", settings, tied=True, head=None).dtype == np.float16
