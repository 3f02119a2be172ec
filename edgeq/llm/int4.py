"""QuantizeInt4: a causal LM's linear layers to ONNX Runtime's weight-only ``com.microsoft.MatMulNBits``.

For ``Y = X @ W`` with W constant [K, N], MatMulNBits computes ``X @ dequant(B)`` where, per output column n and
block b of ``block_size`` consecutive input rows, ``W[k, n] = (q[n, k] - zp[n, b]) * scale[n, b]``, q in
0..2^bits-1. Layout, checked against ONNX Runtime's own quantizer (``matmul_nbits_quantizer``: its C++
``quantize_matmul_4bits``/``_8bits`` write the same bytes as ``pack_matmulnbits``; tests/llm/test_int4.py):

  * B: uint8 [N, ceil(K / block), block * bits / 8]; at 4 bits element k of a block sits in byte k // 2, even k in
    the low nibble; when K is not a multiple of the block, the codes past K are 0, as ORT writes them (the kernels
    stop at K and never read them);
  * scales: [N, ceil(K / block)] in the weight's (= A's) float type;
  * zero_points (asymmetric only): uint8 [N, ceil(blocks * bits / 8)], packed like B. Without them the zero point
    is 2^(bits-1) (8 at 4 bits), which makes symmetric quantization ``scale = signed_absmax / -8`` (ORT's and
    llama.cpp Q4_0's convention): the block's largest-magnitude weight lands exactly on level -8, so all 16 levels
    are used.

Methods: ``rtn`` rounds to nearest (symmetric: signed max|w|; asymmetric: min/max including 0); ``gptq`` is GPTQ
(Frantar et al. 2022) against the calibration Hessian ``H = X^T X`` + ``damp`` x mean(diag H): columns in order (or by
decreasing diag H with ``act_order``, scales then fixed per block beforehand, as MatMulNBits has no permutation),
lazy updates in batches of 128 columns, one scale per ``block_size`` group computed from the error-updated weights
when the group starts. ``clip`` adds, for both, a per-block search of the scale's clip ratio (1.0 down to 0.625)
minimizing the block's squared error weighted by the input-channel energy diag(H) (plain error without statistics).

Sensitive layers get 8 bits: with statistics, each layer's sensitivity is the relative output error of plain INT4
RTN, ``tr(E^T H E) / tr(W^T H W)`` (E = W - RTN(W)), and a layer above ``promote`` x the median is promoted. On
SmolLM2-135M that picks exactly the 30 v_proj layers and layer 0's up_proj (2.5-7x the median; the next layer is at
1.9x): v_proj's output is a low-energy direction of its input, so the same absolute error is 5x more of its signal,
and keeping v_proj alone in FP32 halves the model's KL (bench/int4_methods.py). llama.cpp's Q4_K_M also gives
attn_v more bits. The cost is 4.2M weights at 8 bits instead of 4, +2.1 MB.

A MatMul reading the embedding table (tied lm_head: through a Transpose of the Gather's initializer, or an equal
copy) is kept unless ``quantize_tied``: quantizing a shared table stores a second copy of it beside the Gather's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Collection

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from edgeq.llm.activations import ActivationStats, LinearLayer, linear_layers
from edgeq.passes.base import PassBase, PassResult
from edgeq.progress import QUIET, Progress

BITS = 4
PROMOTED_BITS = 8  # MatMulNBits' other CPU width, for the layers INT4 hurts most
PROMOTE = 2.0  # promote a layer whose INT4 relative output error is above 2x the median (see the module docstring)
METHODS = ("rtn", "gptq")
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(16))  # 1.0 .. 0.625
LAZY_COLUMNS = 128  # GPTQ's lazy batch: error pushed to later columns once per 128 (a multiple of the block)
DAMP = 0.01  # GPTQ's dampening (fraction of mean diag H): its default, definite for every SmolLM2 layer
FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


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


@dataclass(frozen=True)
class Int4Decision:
    """``bits`` 4 or 8 for a quantized layer, 0 for one kept in its float type."""

    node: str
    bits: int
    reason: str
    k: int
    n: int
    sensitivity: float | None = None  # INT4 RTN relative output error, when statistics were given

    @property
    def quantize(self) -> bool:
        return self.bits > 0


@dataclass(frozen=True)
class Int4Result(PassResult):
    decisions: tuple[Int4Decision, ...] = ()
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------- block math


def _params(w: torch.Tensor, symmetric: bool, bits: int, ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of the last dimension (kept as size 1), range shrunk by ``ratio``."""
    lo = w.amin(dim=-1, keepdim=True)
    hi = w.amax(dim=-1, keepdim=True)
    if symmetric:
        signed = torch.where(hi.abs() > lo.abs(), hi, lo)
        return signed * ratio / -_mid(bits), torch.full_like(signed, float(_mid(bits)))
    lo = torch.clamp(lo, max=0.0) * ratio
    hi = torch.clamp(hi, min=0.0) * ratio
    scale = (hi - lo) / _top(bits)
    zp = torch.where(scale == 0, torch.full_like(scale, float(_mid(bits))),
                     torch.round(-lo / _safe(scale))).clamp(0, _top(bits))
    return scale, zp


def _safe(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.ones_like(scale), scale)


def _fake(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.clamp(torch.round(w / _safe(scale)) + zp, 0, _top(bits))
    return q, (q - zp) * scale


def _search(w: torch.Tensor, importance: torch.Tensor | None, symmetric: bool, bits: int,
            clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Block parameters for ``w`` [..., block]; with ``clip`` the ratio with the least (importance-weighted) error."""
    if not clip:
        return _params(w, symmetric, bits)
    best = None
    for ratio in CLIP_RATIOS:
        scale, zp = _params(w, symmetric, bits, ratio)
        err = (w - _fake(w, scale, zp, bits)[1]).square()
        err = (err if importance is None else err * importance).sum(dim=-1, keepdim=True)
        if best is None:
            best = [err, scale, zp]
            continue
        better = err < best[0]
        best = [torch.where(better, err, best[0]), torch.where(better, scale, best[1]), torch.where(better, zp, best[2])]
    return best[1], best[2]


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
        imp[:k] = torch.from_numpy(np.asarray(importance, np.float32))
        imp = imp.view(blocks_n, block_size)
    scale, zp = _search(blocks, imp, symmetric, bits, clip)
    q = _fake(blocks, scale, zp, bits)[0]
    return _block_quant(q.reshape(n, kp), scale[..., 0], zp[..., 0], k, block_size, bits, symmetric)


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, float64; more dampening if H is not definite."""
    mean_diag = h.diagonal().mean()
    for attempt in range(4):
        hd = h.clone()
        hd.diagonal().add_(damp * 10**attempt * mean_diag)
        l, info = torch.linalg.cholesky_ex(hd)
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(l), upper=True)
    raise ValueError("the calibration Hessian is not positive definite even with 1000x the dampening")


def quantize_gptq(w: np.ndarray, hessian: np.ndarray, block_size: int, symmetric: bool, clip: bool = True,
                  damp: float = DAMP, act_order: bool = False, bits: int = BITS) -> BlockQuant:
    """GPTQ of ``w`` [K, N] against ``hessian`` [K, K] (sum X^T X of the layer's inputs)."""
    k, n = w.shape
    groups = math.ceil(k / block_size)
    W = torch.from_numpy(np.ascontiguousarray(w.T, dtype=np.float32)).clone()  # [N, K]: rows are output channels
    H = torch.from_numpy(np.asarray(hessian, np.float64)).clone()
    dead = H.diagonal() == 0  # an input channel that is always 0: its weights do not matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    importance = H.diagonal().to(torch.float32).clone()
    scales = torch.zeros(n, groups)
    zps = torch.zeros(n, groups)
    perm = None
    if act_order:
        # Static groups: a group's columns are visited out of order, so its scale is fixed from the original W.
        for g in range(groups):
            cols = slice(g * block_size, min((g + 1) * block_size, k))
            s, z = _search(W[:, cols], importance[cols], symmetric, bits, clip)
            scales[:, g], zps[:, g] = s[:, 0], z[:, 0]
        perm = torch.argsort(H.diagonal(), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_cholesky(H, damp).to(torch.float32)
    Q = torch.zeros(n, groups * block_size)
    lazy = max(LAZY_COLUMNS // block_size, 1) * block_size  # groups never straddle a lazy batch
    s = z = None
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if perm is not None:
                g = int(perm[col]) // block_size
                s, z = scales[:, g], zps[:, g]
            elif col % block_size == 0:
                span = min(block_size, k - col)
                s, z = _search(W1[:, i:i + span], importance[col:col + span], symmetric, bits, clip)
                s, z = s[:, 0], z[:, 0]
                scales[:, col // block_size], zps[:, col // block_size] = s, z
            wc = W1[:, i]
            q, dq = _fake(wc, s, z, bits)
            Q[:, col] = q
            err = (wc - dq) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if perm is not None:
        Q[:, :k] = Q[:, :k][:, torch.argsort(perm)]
    return _block_quant(Q, scales, zps, k, block_size, bits, symmetric)


def hessian_error(w: np.ndarray, w_hat: np.ndarray, hessian: np.ndarray) -> float:
    """Output error of ``X @ W`` summed over the calibration rows: tr((W - W^)^T H (W - W^))."""
    d = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return float(np.einsum("kn,kj,jn->", d, hessian, d, optimize=True))


def sensitivity(w: np.ndarray, hessian: np.ndarray, block_size: int, symmetric: bool) -> float:
    """Relative output error of plain INT4 RTN: tr(E^T H E) / tr(W^T H W)."""
    signal = hessian_error(w, np.zeros_like(w), hessian)
    if signal == 0:
        return 0.0
    return hessian_error(w, quantize_rtn(w, block_size, symmetric).dequantize(), hessian) / signal


# ---------------------------------------------------------------------------------------------------- packing


def _pack_nibbles(v: np.ndarray) -> np.ndarray:
    """Pairs along the last axis -> one byte, the first of each pair in the low nibble (odd length: padded 0)."""
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (1,), v.dtype)], axis=-1)
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
    zp = None if bq.zero_points is None else pack(bq.zero_points.astype(np.uint8))
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


# ---------------------------------------------------------------------------------------------------- the pass


class QuantizeInt4(PassBase):
    """INT4 MatMulNBits for the chosen linear layers (``nodes``; None: every one), INT8 for the sensitive ones.

    ``int8_nodes`` names the 8-bit layers outright; otherwise, with ``stats``, layers whose INT4 sensitivity is above
    ``promote`` x the median are promoted (``promote=None``: none). ``stats`` is required by ``gptq``.
    """

    def __init__(self, nodes: Collection[str] | None = None, stats: ActivationStats | None = None, *,
                 block_size: int = 32, symmetric: bool = True, accuracy_level: int = 4, method: str = "gptq",
                 clip: bool = True, act_order: bool = False, damp: float = DAMP, quantize_tied: bool = False,
                 int8_nodes: Collection[str] | None = None, promote: float | None = PROMOTE,
                 progress: Progress = QUIET) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown INT4 method '{method}' (known: {', '.join(METHODS)})")
        if block_size < 16 or block_size & (block_size - 1):
            raise ValueError(f"block_size {block_size}: MatMulNBits needs a power of two >= 16")
        if method == "gptq" and stats is None:
            raise ValueError("method 'gptq' needs activation statistics (collect_activation_stats)")
        self.nodes = None if nodes is None else set(nodes)
        self.stats = stats
        self.block_size = block_size
        self.symmetric = symmetric
        self.accuracy_level = accuracy_level
        self.method = method
        self.clip = clip
        self.act_order = act_order
        self.damp = damp
        self.quantize_tied = quantize_tied
        self.int8_nodes = None if int8_nodes is None else set(int8_nodes)
        self.promote = promote
        self.progress = progress

    @property
    def setting(self) -> str:
        return (f"{self.method}{'+clip' if self.clip else ''}, block {self.block_size}, "
                f"{'symmetric' if self.symmetric else 'asymmetric'}, accuracy_level {self.accuracy_level}")

    def plan(self, model: onnx.ModelProto) -> list[tuple[LinearLayer, Int4Decision]]:
        g = model.graph
        inits = {i.name: i for i in g.initializer}
        keep: dict[str, str] = {}
        layers = linear_layers(model)
        for layer in layers:
            dtype = inits[layer.weight].data_type
            if self.nodes is not None and layer.node not in self.nodes:
                keep[layer.node] = "not selected for INT4"
            elif dtype not in FLOAT_TYPES:
                keep[layer.node] = f"weight type {TensorProto.DataType.Name(dtype)} is not float32/float16"
            elif layer.tied_to and not self.quantize_tied:
                keep[layer.node] = (
                    f"tied to the embedding table of '{layer.tied_to}' (read through '{layer.transpose}'): "
                    f"INT4 would store a second copy of its {layer.k * layer.n / 1e6:.1f}M weights beside it; "
                    "quantize_tied=True to do it anyway" if layer.transpose else
                    f"a copy of the embedding table of '{layer.tied_to}' (tied lm_head), kept like the table; "
                    "quantize_tied=True to quantize it")
            elif self.stats is not None and layer.node not in self.stats.layer_input:
                raise ValueError(f"no activation statistics for '{layer.node}'")
        todo = [layer for layer in layers if layer.node not in keep]
        sens = self._sensitivities(inits, todo)
        median = float(np.median(list(sens.values()))) if sens else 0.0
        out = []
        for layer in layers:
            if layer.node in keep:
                out.append((layer, Int4Decision(layer.node, 0, keep[layer.node], layer.k, layer.n)))
                continue
            bits, reason = BITS, f"INT4 ({self.setting})"
            s = sens.get(layer.node)
            if self.int8_nodes is not None:
                if layer.node in self.int8_nodes:
                    bits, reason = PROMOTED_BITS, "INT8: named in int8_nodes"
            elif s is not None and self.promote is not None and s > self.promote * median:
                bits = PROMOTED_BITS
                reason = (f"INT8: INT4 relative output error {s:.4f} is {s / median:.1f}x the median {median:.4f} "
                          f"(promoted above {self.promote:g}x)")
            out.append((layer, Int4Decision(layer.node, bits, reason, layer.k, layer.n, s)))
        return out

    def _sensitivities(self, inits: dict[str, onnx.TensorProto], todo: list[LinearLayer]) -> dict[str, float]:
        if self.stats is None:
            return {}
        return {layer.node: sensitivity(_weight(inits[layer.weight], layer), self.stats.for_node(layer.node).hessian,
                                        self.block_size, self.symmetric) for layer in todo}

    def call(self, model: onnx.ModelProto) -> Int4Result:
        t0 = time.monotonic()
        g = model.graph
        planned = self.plan(model)
        todo = [(layer, d) for layer, d in planned if d.quantize]
        decisions = tuple(d for _, d in planned)
        if not todo:
            return Int4Result(model, False, "no linear layer planned for INT4", decisions)
        inits = {i.name: i for i in g.initializer}
        by_name = {n.name: n for n in g.node}
        packed: dict[tuple[str, bool, int], str] = {}  # (weight, transposed, bits) -> base name of the initializers
        replace: dict[str, onnx.NodeProto] = {}
        for step, (layer, d) in enumerate(todo, 1):
            key = (layer.weight, layer.transpose is not None, d.bits)
            if key not in packed:
                sharing = [l for l, dd in todo if (l.weight, l.transpose is not None, dd.bits) == key]
                packed[key] = self._quantize_weight(g, inits[layer.weight], layer, sharing, d.bits)
            base = packed[key]
            inputs = [layer.input, base + "_B", base + "_scales"] + ([] if self.symmetric else [base + "_zp"])
            attrs = dict(K=layer.k, N=layer.n, bits=d.bits, block_size=self.block_size)
            if self.accuracy_level:  # 0 is "unset"; ORT's quantizer leaves the attribute out then, as we do
                attrs["accuracy_level"] = self.accuracy_level
            replace[layer.node] = helper.make_node("MatMulNBits", inputs, list(by_name[layer.node].output),
                                                   name=f"{layer.node}_Q{d.bits}", domain="com.microsoft", **attrs)
            self.progress.step("INT4 layer", step, len(todo))
        nodes = [replace.get(n.name, n) for n in g.node]
        del g.node[:]
        g.node.extend(nodes)
        _drop_unused(g, [layer for layer, _ in todo])
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        int8 = sum(d.bits == PROMOTED_BITS for _, d in todo)
        summary = (f"{len(todo) - int8} linear layers to INT4 and {int8} to INT8 ({self.setting}), "
                   f"{len(decisions) - len(todo)} kept")
        return Int4Result(model, True, summary, decisions, time.monotonic() - t0)

    def _quantize_weight(self, g: onnx.GraphProto, init: onnx.TensorProto, layer: LinearLayer,
                         sharing: list[LinearLayer], bits: int) -> str:
        w = _weight(init, layer)
        hessian = None
        if self.stats is not None:
            # a weight read by several MatMuls serves all their inputs: their Hessians add
            hessian = sum(self.stats.for_node(l.node).hessian for l in sharing)
        if self.method == "gptq":
            bq = quantize_gptq(w, hessian, self.block_size, self.symmetric, self.clip, self.damp, self.act_order, bits)
        else:
            bq = quantize_rtn(w, self.block_size, self.symmetric, self.clip,
                              None if hessian is None else np.diag(hessian), bits)
        b, scales, zp = pack_matmulnbits(bq, FLOAT_TYPES[init.data_type])
        base = f"{init.name}{'_T' if layer.transpose else ''}_Q{bits}"
        g.initializer.extend([numpy_helper.from_array(b, base + "_B"), numpy_helper.from_array(scales, base + "_scales")])
        if zp is not None:
            g.initializer.append(numpy_helper.from_array(zp, base + "_zp"))
        return base


def _weight(init: onnx.TensorProto, layer: LinearLayer) -> np.ndarray:
    """W [K, N] float32 of a layer."""
    w = numpy_helper.to_array(init)
    return (w.T if layer.transpose else w).astype(np.float32)


def _drop_unused(g: onnx.GraphProto, layers: list[LinearLayer]) -> None:
    """Remove what the replaced layers read and nothing reads any more: a tied lm_head's Transpose, the weights."""
    outputs = {o.name for o in g.output}
    used = {i for n in g.node for i in n.input} | outputs
    transposes = {l.transpose for l in layers if l.transpose}
    for n in [n for n in g.node if n.name in transposes and not any(o in used for o in n.output)]:
        g.node.remove(n)
    used = {i for n in g.node for i in n.input} | outputs
    weights = {l.weight for l in layers}
    for i in reversed(range(len(g.initializer))):  # in place: re-adding the kept ones would copy them
        if g.initializer[i].name in weights and g.initializer[i].name not in used:
            del g.initializer[i]
