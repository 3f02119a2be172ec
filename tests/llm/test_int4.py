"""INT4 MatMulNBits numerics: packing against ONNX Runtime's quantizer and kernel, GPTQ vs RTN, the scale refit.
A decoder quantized with them, layer by layer, against transformers: tests/decoder/test_layerwise.py."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgeq.llm.int4 import (_gram, _unpack_nibbles, dequantize_matmulnbits, hessian_error, pack_matmulnbits, quantize_gptq,
                            quantize_rtn, refit_scales)
from edgeq.runtime import session


def matmulnbits_model(b, scales, zp, k, n, block, bits, accuracy_level=0) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "S")]
    inputs = ["A", "B", "S"]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=accuracy_level)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


# K=96 with block 64 and K=160 with block 128 leave a padded last block (and an odd block count for zero points)
CASES = [(64, 48, 32), (96, 40, 64), (160, 24, 128)]


def ort_quantize(w: np.ndarray, block: int, symmetric: bool, bits: int):
    """ONNX Runtime's own blockwise quantizer (the C++ behind matmul_nbits_quantizer.DefaultWeightOnlyQuantizer)."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    k, n = w.shape
    blocks = -(-k // block)
    b = np.zeros((n, blocks, block * bits // 8), np.uint8)
    s = np.zeros((n, blocks), np.float32)
    zp = np.zeros((n, -(-blocks * bits // 8)), np.uint8)
    padded = np.pad(w, ((0, blocks * block - k), (0, 0)))
    (quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits)(b, padded, s, zp, block, n, k, symmetric)
    return b, s, zp


def codes(b: np.ndarray, bits: int) -> np.ndarray:
    return _unpack_nibbles(b) if bits == 4 else b


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k,n,block", CASES)
def test_packing_is_byte_identical_to_ort_quantizer(k, n, block, symmetric, bits):
    rng = np.random.default_rng(k + n)
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[:block, 0] = 0.0  # an all-zero block
    w[:, 1] = np.abs(w[:, 1])  # an all-positive column
    ort_b, ort_s, ort_zp = ort_quantize(w, block, symmetric, bits)
    b, s, zp = pack_matmulnbits(quantize_rtn(w, block, symmetric, bits=bits))
    assert b.shape == ort_b.shape and b.dtype == np.uint8
    if k % block == 0:
        np.testing.assert_array_equal(b, ort_b)
    else:  # the codes past K are never read; ORT leaves some of them nonzero, so compare the real ones
        np.testing.assert_array_equal(codes(b, bits).reshape(n, -1)[:, :k], codes(ort_b, bits).reshape(n, -1)[:, :k])
    np.testing.assert_array_equal(s, ort_s)
    assert (zp is None) == symmetric
    if zp is not None:
        np.testing.assert_array_equal(zp, ort_zp)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k,n,block", CASES)
def test_ort_matmulnbits_computes_the_numpy_dequantization(k, n, block, symmetric, bits):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((k, n)).astype(np.float32)
    bq = quantize_rtn(w, block, symmetric, clip=True, bits=bits)
    b, s, zp = pack_matmulnbits(bq)
    w_hat = dequantize_matmulnbits(b, s, zp, k, bits)  # from the packed bytes, by the operator's formula
    np.testing.assert_array_equal(w_hat, bq.dequantize())
    x = rng.standard_normal((5, k)).astype(np.float32)
    y = session(matmulnbits_model(b, s, zp, k, n, block, bits)).run(None, {"A": x})[0]
    np.testing.assert_allclose(y, x @ w_hat, rtol=1e-5, atol=1e-5)
    # and the quantization is what it claims: 4 bits lose ~8% of a Gaussian weight, 8 bits ~0.5%
    rel = np.linalg.norm(w_hat - w) / np.linalg.norm(w)
    assert rel < (0.11 if bits == 4 else 0.008)


def correlated_layer(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """W [64, 48] and H = X^T X of 2048 inputs whose 64 channels are mixtures of 8 factors plus 5% noise."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2048, 8)) @ rng.standard_normal((8, 64)) + 0.05 * rng.standard_normal((2048, 64))
    return rng.standard_normal((64, 48)).astype(np.float32), x.T @ x


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_error_below_rtn_on_correlated_inputs(symmetric, act_order):
    w, h = correlated_layer()
    rtn = hessian_error(w, quantize_rtn(w, 32, symmetric).dequantize(), h)
    gptq = hessian_error(w, quantize_gptq(w, h, 32, symmetric, clip=False, act_order=act_order).dequantize(), h)
    # with 8 factors behind 64 channels, GPTQ moves most of the rounding error into directions X never takes:
    # measured 0.022-0.084 of RTN's over the four settings (act_order the lower)
    assert gptq < 0.15 * rtn
    clip_rtn = hessian_error(w, quantize_rtn(w, 32, symmetric, clip=True, importance=np.diag(h)).dequantize(), h)
    clip_gptq = hessian_error(w, quantize_gptq(w, h, 32, symmetric, clip=True, act_order=act_order).dequantize(), h)
    assert clip_gptq < 0.15 * clip_rtn  # measured 0.029-0.082
    # refitting the scales by least squares (codes fixed) can only lower the calibration error: measured to 0.69-0.73
    refit = quantize_gptq(w, h, 32, symmetric, clip=True, act_order=act_order, refit=True)
    assert hessian_error(w, refit.dequantize(), h) < 0.8 * clip_gptq


def test_refit_solves_wide_layers_with_more_blocks_than_batched_lu_handles():
    # a 1B down_proj has 256 blocks of 32 per channel: torch 2.13's batched LU (MKL getrf) printed "Parameter 6 was
    # incorrect on entry to DLASWP" and hung above ~128 blocks; the refit's Cholesky solve must finish and help
    rng = np.random.default_rng(3)
    k, n = 200 * 32, 4
    x = rng.standard_normal((1024, k)).astype(np.float32)  # fewer rows than inputs: H is singular, ridged
    h = x.T.astype(np.float64) @ x
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    bq = quantize_rtn(w, 32, False, clip=True, importance=np.diag(h))
    refit = refit_scales(bq, w, h)
    assert np.isfinite(refit.scales).all()
    assert hessian_error(w, refit.dequantize(), h) < 0.85 * hessian_error(w, bq.dequantize(), h)  # measured 0.80


def on_threads(fn, counts):
    """fn() with torch on each thread count in turn (the count restored after)."""
    before = torch.get_num_threads()
    try:
        return [torch.set_num_threads(t) or fn() for t in counts]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("k", [512, 4160])  # a float64 and a float32 Hessian
def test_clip_search_and_refit_on_worker_threads_equal_one_thread_bit_for_bit(k):
    # the chunks (rows of the search, 64-channel groups of the refit) are independent: spread over torch's thread
    # count they must give the loop's bytes, or packages would differ between a 2-core and an 8-core machine
    rng = np.random.default_rng(11)
    n = 160  # 3 refit chunks, and more search chunks than workers
    x = rng.standard_normal((300, k)).astype(np.float32)
    x[:, :3] *= 30  # outlier inputs: the clip search and the refit both move
    h = x.T.astype(np.float64 if k <= 4096 else np.float32) @ x
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)

    def rtn_and_refit():
        bq = quantize_rtn(w, 32, False, clip=True, importance=np.diag(h))
        return bq, refit_scales(bq, w, h)

    (one, one_refit), *others = on_threads(rtn_and_refit, (1, 2, 3))
    assert not np.array_equal(one.scales, one_refit.scales)  # the refit changed scales: the comparison means something
    for bq, refit in others:
        for got, want in [(bq.q, one.q), (bq.scales, one.scales), (bq.zero_points, one.zero_points),
                          (refit.scales, one_refit.scales)]:
            np.testing.assert_array_equal(got, want)


def test_refit_gram_is_codes_times_hessian_times_codes_per_channel():
    """C^T H C per channel, C the [K, blocks] matrix with channel n's block codes in block b's rows of column b,
    built densely here; the refit builds it block column by block column."""
    rng = np.random.default_rng(5)
    r, nb, bs = 3, 7, 4
    x = rng.standard_normal((64, nb * bs)).astype(np.float32)
    h = torch.from_numpy(x.T @ x)
    c = torch.from_numpy(rng.integers(-8, 8, (r, nb, bs)).astype(np.float32))
    for n in range(r):
        dense = torch.zeros(nb * bs, nb)
        for b in range(nb):
            dense[b * bs:(b + 1) * bs, b] = c[n, b]
        want = (dense.T.double() @ h.double() @ dense.double()).numpy()
        np.testing.assert_allclose(_gram(c, h)[n].double().numpy(), want, rtol=1e-5, atol=1e-3)  # float32 sums


@pytest.mark.parametrize("k", [512, 4160])  # float64 below FLOAT64_MAX_K (4096); float32 and trtri above it
def test_inverse_cholesky_is_the_upper_factor_of_the_dampened_inverse(k):
    """U^T U = (H + damp * mean(diag H) * I)^-1 with U upper and a positive diagonal, both ways of computing it."""
    import torch

    from edgeq.llm.activations import FLOAT64_MAX_K
    from edgeq.llm.int4 import _inverse_cholesky

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2 * k, k)).astype(np.float32) * rng.uniform(0.1, 3.0, k).astype(np.float32)
    dtype = np.float64 if k <= FLOAT64_MAX_K else np.float32
    h = torch.from_numpy((x.T @ x).astype(dtype))
    u = _inverse_cholesky(h, 0.01).double()
    assert torch.equal(u, torch.triu(u)) and bool((u.diagonal() > 0).all())
    hd = h.double() + 0.01 * h.double().diagonal().mean() * torch.eye(k, dtype=torch.float64)
    err = (u.T @ u @ hd - torch.eye(k, dtype=torch.float64)).abs().max()
    assert err < 1e-5, float(err)  # measured 1.5e-7 (float64, U cast to float32) and 6.3e-7 (float32 + trtri)


@pytest.mark.parametrize("k", [64, 4100])  # float64 traces, and float32 ones above FLOAT64_MAX_K
def test_sensitivity_a_chunk_of_columns_at_a_time_is_the_whole_matrix_one(monkeypatch, k):
    """RTN quantizes each column alone, so the traces add up over column chunks (an 8B head whole took the export
    to 14.4 GB): the chunked sensitivity is the whole-matrix one up to the order of float sums."""
    from edgeq.llm import int4

    rng = np.random.default_rng(3)
    x = rng.standard_normal((k + 16, k)).astype(np.float32)
    h = x.T.astype(np.float64) @ x if k <= 4096 else x.T @ x
    w = rng.standard_normal((k, 40)).astype(np.float32)
    whole = int4.sensitivity(w, h, 32, False)
    e = hessian_error(w, quantize_rtn(w, 32, False).dequantize(), h) / hessian_error(w, None, h)
    assert whole == pytest.approx(e, rel=1e-12)
    monkeypatch.setattr(int4, "SENSITIVITY_COLUMNS", 16)  # 40 columns: chunks of 16, 16 and 8
    assert int4.sensitivity(w, h, 32, False) == pytest.approx(whole, rel=1e-6 if k > 4096 else 1e-12)
