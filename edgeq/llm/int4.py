"""INT4 (and INT8) weight-only quantization for ONNX Runtime's ``com.microsoft.MatMulNBits``: the numerics.

Blockwise codes, scales and zero points in the layout ORT's own ``matmul_nbits_quantizer`` writes
(tests/llm/test_int4.py compares the bytes). Methods: ``rtn``, ``gptq`` (against the calibration Hessian), ``clip``
(a per-block search of the scale's clip ratio) and ``refit`` (least-squares block scales, codes fixed), plus the
measures the policy decides from (``sensitivity``: plain RTN's relative output error). edgeq/decoder/layerwise.py
quantizes each planned layer with these, one decoder layer at a time; the plan comes from edgeq/policy/causal_lm.py.
The layout, each method and the measurements behind the defaults (SmolLM2-135M: ORT's RTN +20.6% perplexity,
edgeq's default +5.9%): see docs/decisions/int4.md.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from edgeq.llm.activations import FLOAT64_MAX_K
from edgeq.policy.causal_lm import BITS

CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(16))  # 1.0 .. 0.625
LAZY_COLUMNS = 128  # GPTQ's lazy batch: error pushed to later columns once per 128 (a multiple of the block)
VECTOR_SEARCH_ELEMENTS = 1 << 20  # clip search: all ratios at once over this many values (4 MB of float32)
DAMP = 0.01  # GPTQ's dampening (fraction of mean diag H): its default, definite for every SmolLM2 layer

T = TypeVar("T")
R = TypeVar("R")


def _mid(bits: int) -> int:
    return 2 ** (bits - 1)


def _top(bits: int) -> int:
    return 2**bits - 1


@dataclass(frozen=True)
class BlockQuant:
    """Codes of W^T: ``q`` uint8 [N, Kpad] in 0..2^bits-1, ``scales`` float32 [N, blocks], ``zero_points`` uint8
    [N, blocks] or None (symmetric: the default 2^(bits-1))."""

    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    k: int
    block_size: int
    bits: int = BITS

    def dequantize(self) -> np.ndarray:
        """W [K, N] float32 as MatMulNBits sees it."""
        n, kp = self.q.shape
        zp = _mid(self.bits) if self.zero_points is None else self.zero_points[:, :, None].astype(np.float32)
        blocks = (self.q.reshape(n, -1, self.block_size).astype(np.float32) - zp) * self.scales[:, :, None]
        return blocks.reshape(n, kp)[:, : self.k].T.copy()


# ---------------------------------------------------------------------------------------------------- block math


def _params(w: torch.Tensor, symmetric: bool, bits: int,
            ratio: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of the last dimension (kept as size 1), range shrunk by ``ratio``."""
    lo = w.amin(dim=-1, keepdim=True)
    hi = w.amax(dim=-1, keepdim=True)
    if symmetric:
        signed = torch.where(hi.abs() > lo.abs(), hi, lo)
        scale = signed * ratio / -_mid(bits)
        return scale, torch.full_like(scale, float(_mid(bits)))
    lo = torch.clamp(lo, max=0.0) * ratio
    hi = torch.clamp(hi, min=0.0) * ratio
    scale = (hi - lo) / _top(bits)
    zp = torch.where(scale == 0, 0.0, _round(-lo / _safe(scale))).clamp(0, _top(bits))  # all-zero block: 0, as ORT
    return scale, zp


def _safe(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _round(x: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero, as ORT's quantizer rounds) where x >= 0; torch rounds half to even, so a tie
    it rounded down gets its 1 back (x - round(x) is exact in float32). A negative tie may round toward zero instead:
    both callers clamp at 0, where the two agree."""
    r = torch.round(x)
    return r + ((x - r) == 0.5)


def _fake(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    # w times the reciprocal of the scale, plus the zero point, then roundf, as ORT's quantizer: each of the three
    # decides which way a value within float32 rounding of a .5 tie goes
    q = torch.clamp(_round(w * (1.0 / _safe(scale)) + zp), 0, _top(bits))
    return q, (q - zp) * scale


@contextlib.contextmanager
def _one_thread():
    """Elementwise work on small tensors in this thread only: torch's OpenMP workers spin between the thousands of
    small ops, and on a loaded 2-core machine that spinning made the clip search 10-20x slower (13 s -> 123 s for a
    1B gate_proj's blocks measured under load; 6 s on one thread). The large matmuls keep every thread.
    Yields the thread count it replaced: ``_map_chunks`` spreads independent chunks over that many workers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield before
    finally:
        torch.set_num_threads(before)


def _map_chunks(fn: Callable[[T], R], chunks: Sequence[T], workers: int) -> list[R]:
    """``[fn(c) for c in chunks]`` on ``workers`` Python threads, each op on one torch thread (call it inside
    ``_one_thread``). The chunks are independent and each is computed by the same ops as in a loop, so the results
    are the loop's, bit for bit. torch's kernels run outside the GIL, the Python between them takes turns: on an
    idle 2-core machine the clip search and the refit of 8B-shaped layers take 20-35% less time, under load far less
    (the clip search and refit were 95% of an 8B RTN export's quantize stage, on one thread)."""
    if workers <= 1 or len(chunks) <= 1:
        return [fn(c) for c in chunks]
    return list(_pool(workers).map(fn, chunks))


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    """One pool for the process, its threads started on first use (not once per quantized linear)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="edgeq-quantize")


def _search(w: torch.Tensor, importance: torch.Tensor | None, symmetric: bool, bits: int,
            clip: bool, workers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Block parameters for ``w`` [..., block]; with ``clip`` the ratio with the least (importance-weighted) error,
    the first such ratio on a tie. Every ratio at once over a chunk of rows: the same elementwise arithmetic as one
    ratio at a time, without 16 passes over a whole matrix's temporaries (1B gate_proj RTN: 19.5 s before); the
    chunks on ``workers`` threads (``_map_chunks``)."""
    if not clip:
        return _params(w, symmetric, bits)
    rows = max(1, VECTOR_SEARCH_ELEMENTS // (len(CLIP_RATIOS) * max(1, w[0].numel())))
    if len(w) <= rows:
        return _search_chunk(w, importance, symmetric, bits)
    # a chunk of rows at a time: every ratio's temporaries stay small (in cache)
    imp = [importance] * math.ceil(len(w) / rows) if importance is None or importance.dim() < w.dim() \
        else importance.split(rows)
    parts = _map_chunks(lambda c: _search_chunk(*c, symmetric, bits), list(zip(w.split(rows), imp)), workers)
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _search_chunk(w: torch.Tensor, importance: torch.Tensor | None, symmetric: bool,
                  bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_search`` over rows whose every ratio's temporaries fit VECTOR_SEARCH_ELEMENTS."""
    ratios = torch.tensor(CLIP_RATIOS, dtype=w.dtype).view(-1, *([1] * w.dim()))
    scale, zp = _params(w.unsqueeze(0), symmetric, bits, ratios)  # [ratios, ..., 1]
    err = (w - _fake(w, scale, zp, bits)[1]).square()
    err = (err if importance is None else err * importance).sum(dim=-1, keepdim=True)
    pick = err.argmin(dim=0, keepdim=True)  # the first minimum, as a loop over the ratios with a strict "<" keeps
    return scale.gather(0, pick)[0], zp.gather(0, pick)[0]


def _block_quant(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, k: int, block_size: int, bits: int,
                 symmetric: bool) -> BlockQuant:
    q = q.clone()
    q[:, k:] = 0  # the padding's codes, as ORT writes them
    return BlockQuant(q.to(torch.uint8).numpy(), scale.to(torch.float32).numpy(),
                      None if symmetric else zp.to(torch.uint8).numpy(), k, block_size, bits)


def quantize_rtn(w: np.ndarray, block_size: int, symmetric: bool, clip: bool = False,
                 importance: np.ndarray | None = None, bits: int = BITS) -> BlockQuant:
    """Round to nearest. ``w`` [K, N]; ``importance`` [K] (e.g. diag H) weights the clip search's error."""
    k, n = w.shape
    blocks_n = math.ceil(k / block_size)
    kp = blocks_n * block_size
    wt = torch.zeros(n, kp, dtype=torch.float32)  # zero padding: it never widens a block's range
    wt[:, :k] = torch.from_numpy(np.ascontiguousarray(w.T, dtype=np.float32))
    blocks = wt.view(n, blocks_n, block_size)
    imp = None
    if importance is not None:
        imp = torch.zeros(kp, dtype=torch.float32)
        imp[:k] = torch.from_numpy(np.array(importance, np.float32))  # a copy: np.diag gives a read-only view
        imp = imp.view(blocks_n, block_size)
    with _one_thread() as workers:
        scale, zp = _search(blocks, imp, symmetric, bits, clip, workers)
        rows = max(1, VECTOR_SEARCH_ELEMENTS // max(1, kp))  # the codes: elementwise, in chunks of rows as well
        q = torch.cat(_map_chunks(lambda c: _fake(*c, bits)[0],
                                  list(zip(blocks.split(rows), scale.split(rows), zp.split(rows))), workers))
    return _block_quant(q.reshape(n, kp), scale[..., 0], zp[..., 0], k, block_size, bits, symmetric)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 = U^T U, in H's precision (float64 up to
    FLOAT64_MAX_K; a float32 H falls back to float64 where float32 finds it not definite); more dampening if H is
    not definite."""
    mean_diag = h.diagonal().mean()
    for attempt in range(4):
        for dtype in dict.fromkeys((h.dtype, torch.float64)):
            hd = h.to(dtype, copy=True)
            hd.diagonal().add_(damp * 10**attempt * mean_diag.to(dtype))
            u = _upper_factor_of_inverse(hd) if len(hd) > FLOAT64_MAX_K else _upper_factor_of_inverse_small(hd)
            del hd
            if u is not None and bool(torch.isfinite(u.diagonal()).all()):
                return u.to(torch.float32)
    raise ValueError("the calibration Hessian is not positive definite even with 1000x the dampening")


def _upper_factor_of_inverse_small(hd: torch.Tensor) -> torch.Tensor | None:
    """factor -> inverse -> factor again (2K^3/3 multiply-adds): kept for inputs up to FLOAT64_MAX_K wide, whose
    results the stored SmolLM2 figures rest on (the faster way below moves float64's last bits, and GPTQ follows
    them: SmolLM2's default went from +5.98% to +6.02% perplexity)."""
    l, info = torch.linalg.cholesky_ex(hd)
    if info != 0:
        return None
    u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(l), upper=True)
    return u if info == 0 else None


def _upper_factor_of_inverse(hd: torch.Tensor) -> torch.Tensor | None:
    """U = R^-1 for H = R R^T, R upper (the lower Cholesky factor of H reversed in both axes): one factorisation and
    one triangular inverse, K^3/3 multiply-adds, and one float32 factorisation fewer to lose digits in. A 1B
    down_proj's (K = 8192, float32) on this 2-core machine: 2.3 s against 4.7 s idle, 15.6 s against 112 s beside
    other jobs; U within 1.9e-5 of the other way's."""
    from scipy.linalg import lapack  # torch has no triangular inverse (LAPACK's trtri)

    l, info = torch.linalg.cholesky_ex(hd.flip(0, 1))
    if info != 0:
        return None
    r = l.flip(0, 1).numpy()  # flip copies: R is upper triangular, zeros below
    del l
    inverse, info = lapack.get_lapack_funcs("trtri", (r,))(r, lower=0, overwrite_c=1)
    return torch.from_numpy(inverse) if info == 0 and (inverse.diagonal() > 0).all() else None


def quantize_gptq(w: np.ndarray, hessian: np.ndarray, block_size: int, symmetric: bool, clip: bool = True,
                  damp: float = DAMP, act_order: bool = False, bits: int = BITS, refit: bool = False) -> BlockQuant:
    """GPTQ of ``w`` [K, N] against ``hessian`` [K, K] (sum X^T X of the layer's inputs)."""
    k, n = w.shape
    groups = math.ceil(k / block_size)
    # [K, N] as stored: column ``col`` of GPTQ's W (all output channels of one input) is a contiguous row here, so
    # the per-column steps read and update contiguous memory (3x faster than [N, K] on a 1B model's layers)
    W = torch.from_numpy(np.array(w, dtype=np.float32))
    # a copy (dead channels are patched below), float64 up to FLOAT64_MAX_K
    H = torch.from_numpy(np.array(hessian, dtype=np.float64 if k <= FLOAT64_MAX_K else np.float32))
    dead = H.diagonal() == 0  # an input channel that is always 0: its weights do not matter
    H[dead, dead] = 1.0
    W[dead, :] = 0.0
    importance = H.diagonal().to(torch.float32).clone()
    scales = torch.zeros(n, groups)
    zps = torch.zeros(n, groups)
    perm = None
    if act_order:
        # Static groups: a group's columns are visited out of order, so its scale is fixed from the original W.
        for g in range(groups):
            rows = slice(g * block_size, min((g + 1) * block_size, k))
            s, z = _search(W[rows].T.contiguous(), importance[rows], symmetric, bits, clip)
            scales[:, g], zps[:, g] = s[:, 0], z[:, 0]
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[perm], H[perm][:, perm]
    # The clip search weights by diag(H), not by GPTQ's own column cost 1 / U_ii^2: that one lowers the layer error
    # 3-5% but raised SmolLM2's KL from 0.168 to 0.209 with every layer INT4 (symmetric block 32).
    U = _inverse_cholesky(H, damp)
    del H
    Q = torch.zeros(groups * block_size, n)
    lazy = max(LAZY_COLUMNS // block_size, 1) * block_size  # groups never straddle a lazy batch
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        W1 = W[i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        with _one_thread():
            _gptq_columns(W1, E1, U1, Q, scales, zps, importance, perm, i1, k, block_size, symmetric, bits, clip)
        # [N, b] @ [b, rest] as GPTQ's [N, K] layout multiplies: the same products, so the same rounding
        W[i2:] -= (E1.T.contiguous() @ U[i1:i2, i2:]).T
    if perm is not None:
        Q[:k] = Q[:k][torch.argsort(perm)]
    Q = Q.T.contiguous()
    bq = _block_quant(Q, scales, zps, k, block_size, bits, symmetric)
    return refit_scales(bq, w, hessian) if refit else bq


# GPTQ's column loop stays on one thread: split by output channels over two workers it gave the same bytes but was
# no faster on this 2-core machine when idle (8B-shaped gate_up 18.2 -> 16.8 s, down_proj 26.2 -> 32.2 s: each
# per-column op is a few microseconds, and the workers queue on the GIL between them)
def _gptq_columns(W1: torch.Tensor, E1: torch.Tensor, U1: torch.Tensor, Q: torch.Tensor, scales: torch.Tensor,
                  zps: torch.Tensor, importance: torch.Tensor, perm: torch.Tensor | None, i1: int, k: int,
                  block_size: int, symmetric: bool, bits: int, clip: bool) -> None:
    """One lazy batch of GPTQ's columns (rows ``i1``.. of W as [K, N]): quantize each, push its error onto the
    batch's later columns; codes into ``Q``, the scaled errors into ``E1``, new block parameters into scales/zps."""
    s = z = None  # a lazy batch starts on a block boundary (lazy is a multiple of block_size)
    for i in range(len(W1)):
        col = i1 + i
        if perm is not None:
            g = int(perm[col]) // block_size
            s, z = scales[:, g], zps[:, g]
        elif col % block_size == 0:
            span = min(block_size, k - col)
            s, z = _search(W1[i:i + span].T.contiguous(), importance[col:col + span], symmetric, bits, clip)
            s, z = s[:, 0], z[:, 0]
            scales[:, col // block_size], zps[:, col // block_size] = s, z
        wc = W1[i]
        q, dq = _fake(wc, s, z, bits)
        Q[col] = q
        err = (wc - dq) / U1[i, i]
        W1[i:] -= U1[i, i:, None] * err[None, :]
        E1[i] = err


def refit_scales(bq: BlockQuant, w: np.ndarray, hessian: np.ndarray, rows: int = 64) -> BlockQuant:
    """Keep the codes, re-solve every output channel's block scales by least squares against the original W:
    min_s (w - C s)^T H (w - C s), C the [K, blocks] matrix of the channel's centred codes. The current scales are
    one candidate, so the calibration error can only go down (SmolLM2: 4-9% per layer)."""
    n, kp = bq.q.shape
    k, bs = bq.k, bq.block_size
    nb = kp // bs
    zp = _mid(bq.bits) if bq.zero_points is None else bq.zero_points[:, :, None].astype(np.float32)
    c = torch.from_numpy(bq.q.reshape(n, nb, bs).astype(np.float32) - zp)
    c.view(n, kp)[:, k:] = 0.0
    h = torch.from_numpy(np.asarray(hessian, np.float32))  # read only; a float32 H is not copied (8B down: 0.8 GB)
    if kp != k:
        h = torch.nn.functional.pad(h, (0, kp - k, 0, kp - k))
    wt = torch.zeros(n, kp)
    wt[:, :k] = torch.from_numpy(np.ascontiguousarray(w.T, dtype=np.float32))
    r_all = (c * (wt @ h).view(n, nb, bs)).sum(2).double()  # C^T H w per channel: [N, blocks]
    scales = torch.from_numpy(bq.scales.copy())

    def refit(i: int) -> torch.Tensor:
        a = _gram(c[i:i + rows], h).double()
        diag = a.diagonal(dim1=1, dim2=2)
        diag += torch.where(diag > 0, 1e-9 * diag.mean(1, keepdim=True), 1.0)  # an all-zero block solves to 0
        r = r_all[i:i + rows, :, None]
        # Cholesky, not LU: A is symmetric positive definite once ridged, and torch 2.13's batched LU (MKL getrf)
        # fails above ~128 blocks (a 1B down_proj's 256: "Parameter 6 was incorrect on entry to DLASWP", then a hang)
        chol, info = torch.linalg.cholesky_ex(a)
        sol = torch.cholesky_solve(r, chol)
        old = scales[i:i + rows, :, None].double()
        # keep a channel's old scales unless the solve is finite and better (float32 sums can be off by a hair)
        better = _quadratic(a, r, sol) <= _quadratic(a, r, old)
        ok = (info == 0) & torch.isfinite(sol).all(dim=(1, 2)) & better
        return torch.where(ok[:, None], sol[:, :, 0].float(), scales[i:i + rows])

    with _one_thread() as workers:  # channels apart: each chunk's Gram GEMMs are small (32 deep), one thread each
        chunks = _map_chunks(refit, range(0, n, rows), workers)
    return BlockQuant(bq.q, torch.cat(chunks).numpy(), bq.zero_points, k, bs, bq.bits)


def _gram(c: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """C^T H C per channel, [r, blocks, blocks], for centred codes ``c`` [r, blocks, block]: entry (a, b) is
    c_a^T H_ab c_b, so block column b is (C_b H[rows of b, :]) times the codes, summed per block; only a <= b is
    computed and then mirrored. The GEMM outputs stay [r, K] (in cache): an 8B down_proj's Gram matrices take ~25 s
    on one thread, where one einsum through a [r, K, blocks] temporary (1.6 GB per 64 channels) took ~230 s (both
    from 64 channels, measured beside another job; its whole refit, Cholesky solves included, took 47 s)."""
    r, nb, bs = c.shape
    flat = c.reshape(r, nb * bs)
    a = torch.zeros(r, nb, nb, dtype=c.dtype)
    for b in range(nb):
        top = (b + 1) * bs
        a[:, : b + 1, b] = ((c[:, b] @ h[b * bs:top, :top]) * flat[:, :top]).view(r, b + 1, bs).sum(2)
    upper = torch.triu_indices(nb, nb, 1)
    a[:, upper[1], upper[0]] = a[:, upper[0], upper[1]]
    return a


def _quadratic(a: torch.Tensor, r: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(w - C s)^T H (w - C s) up to the constant w^T H w, per channel: s^T A s - 2 r^T s."""
    return (s.transpose(1, 2) @ a @ s - 2 * r.transpose(1, 2) @ s)[:, 0, 0]


def hessian_error(w: np.ndarray, w_hat: np.ndarray | None, hessian: np.ndarray | torch.Tensor) -> float:
    """Output error of ``X @ W`` summed over the calibration rows: tr((W - W^)^T H (W - W^)) (``w_hat`` None: the
    signal tr(W^T H W)). Above FLOAT64_MAX_K, H @ D in float32 (a 1B model's down_proj: 137 GFLOP, 8 s in float64)
    with the trace summed in float64."""
    if len(hessian) <= FLOAT64_MAX_K:
        d = np.asarray(w, np.float64) if w_hat is None else np.subtract(w, w_hat, dtype=np.float64)
        h = hessian.numpy() if isinstance(hessian, torch.Tensor) else hessian
        return float(np.einsum("kn,kj,jn->", d, np.asarray(h, np.float64), d, optimize=True))
    h = hessian if isinstance(hessian, torch.Tensor) else torch.from_numpy(np.asarray(hessian, np.float32))
    d = torch.from_numpy(np.asarray(w, np.float32) if w_hat is None else np.subtract(w, w_hat, dtype=np.float32))
    return float((d.double() * (h @ d).double()).sum())


# columns per step of ``sensitivity``: RTN quantizes each column on its own, so the traces add up over column
# chunks; whole, an 8B model's untied head [4096, 128256] took the export to 14.4 GB peak RSS for one number
SENSITIVITY_COLUMNS = 8192


def sensitivity(w: np.ndarray, hessian: np.ndarray, block_size: int, symmetric: bool) -> float:
    """Relative output error of plain INT4 RTN: tr(E^T H E) / tr(W^T H W)."""
    # one float32 copy for both traces where they run in float32
    h = hessian if len(hessian) <= FLOAT64_MAX_K else torch.from_numpy(np.asarray(hessian, np.float32))
    signal = error = 0.0
    for c in range(0, w.shape[1], SENSITIVITY_COLUMNS):
        wc = np.ascontiguousarray(w[:, c:c + SENSITIVITY_COLUMNS])
        signal += hessian_error(wc, None, h)
        error += hessian_error(wc, quantize_rtn(wc, block_size, symmetric).dequantize(), h)
    return 0.0 if signal == 0 else error / signal


# ---------------------------------------------------------------------------------------------------- packing


def _pack_nibbles(v: np.ndarray, pad: int = 0) -> np.ndarray:
    """Pairs along the last axis -> one byte, the first of each pair in the low nibble (odd length: padded)."""
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.full(v.shape[:-1] + (1,), pad, v.dtype)], axis=-1)
    v = v.astype(np.uint8)
    return (v[..., 0::2] & 0x0F) | ((v[..., 1::2] & 0x0F) << 4)


def _unpack_nibbles(b: np.ndarray) -> np.ndarray:
    out = np.empty(b.shape[:-1] + (b.shape[-1] * 2,), np.uint8)
    out[..., 0::2] = b & 0x0F
    out[..., 1::2] = b >> 4
    return out


def pack_matmulnbits(bq: BlockQuant, dtype=np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """MatMulNBits inputs: B [N, blocks, block * bits / 8], scales [N, blocks], zero_points (packed) or None."""
    n, kp = bq.q.shape
    q = bq.q.reshape(n, kp // bq.block_size, bq.block_size)
    pack = _pack_nibbles if bq.bits == 4 else np.ascontiguousarray
    # an odd block count leaves a spare zero-point nibble: 8, the default zero point, as ORT writes it
    zp = None if bq.zero_points is None else (
        _pack_nibbles(bq.zero_points.astype(np.uint8), _mid(4)) if bq.bits == 4 else np.ascontiguousarray(bq.zero_points))
    return pack(q.astype(np.uint8)), bq.scales.astype(dtype), zp


def dequantize_matmulnbits(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int,
                           bits: int = BITS) -> np.ndarray:
    """W [K, N] float32 from MatMulNBits' inputs, by the operator's formula (independent of BlockQuant)."""
    n, blocks, _ = b.shape
    unpack = _unpack_nibbles if bits == 4 else np.asarray
    q = unpack(b).astype(np.float32)  # [N, blocks, block]
    zp = (np.full((n, blocks), _mid(bits), np.float32) if zero_points is None
          else unpack(zero_points.reshape(n, -1))[:, :blocks].astype(np.float32))
    w = (q - zp[:, :, None]) * scales.astype(np.float32).reshape(n, blocks)[:, :, None]
    return w.reshape(n, -1)[:, :k].T.copy()
