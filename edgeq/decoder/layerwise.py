"""Layer by layer: what the INT4 policy measures, the quantized layers, and the FP32 reference, with one decoder
layer's weights and the token windows' hidden states in memory at a time.

Two passes over the layers, both carrying FP32 hidden states from layer to layer (so every Hessian is the one a
whole-model calibration of the FP32 model collects; tests/decoder/test_layerwise.py checks them against
transformers' own forward):

1. ``measure``: each layer's linear-input Hessians over the calibration windows give each linear layer's INT4
   sensitivity; the evaluation windows go through the same FP32 layers and the head into reference
   log-probabilities on disk. The policy then decides every layer's bits at once (it ranks sensitivities against
   their median and counts the whole model against the size budget).
2. ``quantized_layers``: the Hessians again (recomputed rather than kept: an 8B model's would take ~60 GB), each
   linear role quantized as the plan says, yielded to the writer and dropped. With a ``QuantizedStore`` each
   quantized linear stays readable (from the package it was written into), and a later pass 2 (the closest-fix
   search's candidates, edgeq/stages/remedy.py) takes the ones it would compute again from there: only the layers
   whose bits or settings changed are quantized, and the forward stops after the last of them.

Peak memory is one layer in FP32, its session's copy, one layer's Hessians ([K, K] per distinct input: float64 up
to FLOAT64_MAX_K wide, float32 above) and the windows' hidden states ([windows, tokens, hidden] float32 for
calibration and evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import onnx
from onnx import helper

from edgeq.decoder.graph import (MODEL_FILE, embed, embedding_table, final_norm_weight, head_logits, head_weight,
                                 layer_model, write_decoder)
from edgeq.decoder.layers import ROLES, LayerWeights, QuantizedLinear, Weight, layer_weights
from edgeq.decoder.spec import DecoderSpec
from edgeq.decoder.weights import TensorSource
from edgeq.errors import EdgeqError
from edgeq.llm.activations import InputStats
from edgeq.llm.evaluate import ReferenceLogits, log_softmax
from edgeq.llm.int4 import DAMP, pack_matmulnbits, quantize_gptq, quantize_rtn, refit_scales, sensitivity
from edgeq.policy.causal_lm import BITS, HEAD_NAME, PROMOTED_BITS, Int4Decision, Int4Facts, LinearFacts
from edgeq.profiles import INT4_METHODS
from edgeq.progress import QUIET, Progress
from edgeq.runtime import session

# the layer graph's tap that carries each role's input (gate and up read the same tensor, so share a Hessian)
TAPS = {"qkv": "tap/qkv", "o": "tap/o", "gate": "tap/gate_up", "up": "tap/gate_up", "down": "tap/down"}
EMBEDDING = "model.embed_tokens.weight"  # the names the size budget counts by (LinearFacts.weight)
HEAD = HEAD_NAME


# each role's module, as the graph builder names its nodes (/<module>/MatMul or /<module>/MatMulNBits)
MODULES = {"qkv": "attn.qkv_proj", "o": "attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
           "down": "mlp.down_proj"}


def linear_name(layer: int | None, role: str) -> str:
    """The linear layer's name in plans and in the graph (``None``: the head)."""
    return HEAD if layer is None else f"model.layers.{layer}.{MODULES[role]}"


def weight_name(layer: int, role: str) -> str:
    return f"{linear_name(layer, role)}.weight"


@dataclass(frozen=True)
class QuantSettings:
    """How a planned layer is quantized (the profile's llm section), checked when made: the profile checks its own
    values, and a bench or test that sets them by hand gets the same refusals."""

    method: str = "gptq"
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4
    clip: bool = True
    damp: float = DAMP
    refit: bool | None = None  # None: after RTN only (docs/decisions/int4.md)

    def __post_init__(self) -> None:
        if self.method not in INT4_METHODS:
            raise ValueError(f"unknown INT4 method '{self.method}' (known: {', '.join(INT4_METHODS)})")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size {self.block_size}: MatMulNBits needs a power of two >= 16")

    @property
    def refits(self) -> bool:
        return self.method == "rtn" if self.refit is None else self.refit


@dataclass(frozen=True)
class Measured:
    """What pass 1 measured: the policy's facts and the FP32 reference log-probabilities of the evaluation windows
    (None when none were given) (``head_hessian``: the head's input Hessian, for a head the plan quantizes)."""

    facts: Int4Facts
    reference: ReferenceLogits | None
    head_hessian: np.ndarray


class QuantizedStore:
    """Quantized linears by (linear, bits, settings), for the passes 2 of one export.

    A linear's quantization depends on its FP32 weight, its FP32 input Hessian (pass 2 carries FP32 hidden states,
    never quantized ones), its bits and the settings: the same key gives the same bytes, so a stored one is what
    quantizing again would give. A linear put while a package is being written (``writing``) is read back from that
    package's model.onnx.data by its offsets, so the store costs no disk beside the package (it was a second copy
    of every quantized linear: 0.7 GB on a 1B model, ~5 GB on an 8B one); a folder about to be deleted (a
    closest-fix candidate's) is ``spill``-ed first: its linears the store points into are copied to .npz files."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._where: dict[tuple[str, int, QuantSettings], Path | tuple[Path, tuple[int, ...]]] = {}
        self._folder: Path | None = None
        self._tensors: dict[Path, dict[str, onnx.TensorProto]] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: tuple[str, int, QuantSettings]) -> bool:
        return key in self._where

    def writing(self, folder: Path | None) -> None:
        """Linears put from now on are read back from ``folder``'s package once it is written."""
        self._folder = None if folder is None else Path(folder)

    def get(self, key: tuple[str, int, QuantSettings]) -> QuantizedLinear:
        where = self._where[key]
        if isinstance(where, Path):
            with np.load(where) as f:
                zp = f["zero_points"] if "zero_points" in f else None
                return QuantizedLinear(f["b"], f["scales"], zp, *(int(v) for v in f["shape"]))
        folder, shape = where
        name, bits = key[0], key[1]
        arrays = [self._read(folder, f"{name}.{suffix}") for suffix in (f"weight_Q{bits}", "weight_scales")]
        zp = self._read(folder, f"{name}.weight_zp", optional=True)
        return QuantizedLinear(arrays[0], arrays[1], zp, *shape)

    def put(self, key: tuple[str, int, QuantSettings], q: QuantizedLinear) -> None:
        if self._folder is not None:
            self._where[key] = (self._folder, (q.k, q.n, q.bits, q.block_size, q.accuracy_level))
            return
        self._save(key, q)

    def spill(self, folder: Path) -> None:
        """Copy the linears the store reads from ``folder`` to its own files, before ``folder`` is deleted."""
        folder = Path(folder)
        for key, where in list(self._where.items()):
            if not isinstance(where, Path) and where[0] == folder:
                self._save(key, self.get(key))
        self._tensors.pop(folder, None)

    def _save(self, key: tuple[str, int, QuantSettings], q: QuantizedLinear) -> None:
        path = self.directory / f"{sum(isinstance(w, Path) for w in self._where.values())}.npz"
        arrays = {"b": q.b, "scales": q.scales, **({} if q.zero_points is None else {"zero_points": q.zero_points})}
        np.savez(path, shape=np.array([q.k, q.n, q.bits, q.block_size, q.accuracy_level]), **arrays)
        self._where[key] = path

    def _read(self, folder: Path, name: str, optional: bool = False) -> np.ndarray | None:
        if folder not in self._tensors:
            graph = onnx.load(str(folder / MODEL_FILE), load_external_data=False).graph
            self._tensors[folder] = {t.name: t for t in graph.initializer}
        proto = self._tensors[folder].get(name)
        if proto is None:
            if optional:
                return None
            raise EdgeqError(f"the package in {folder} has no tensor {name}", "this is an edgeq bug; please report it")
        info = {e.key: e.value for e in proto.external_data}
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(proto.data_type)).newbyteorder("<")
        count = int(np.prod(proto.dims, dtype=np.int64))
        array = np.fromfile(folder / info["location"], dtype=dtype, count=count, offset=int(info.get("offset", 0)))
        return array.reshape(tuple(proto.dims)).astype(dtype.newbyteorder("="))


def _stored(store: QuantizedStore | None, key: tuple[str, int, QuantSettings],
            make: Callable[[], QuantizedLinear]) -> QuantizedLinear:
    if store is not None and key in store:
        return store.get(key)
    q = make()
    if store is not None:
        store.put(key, q)
    return q


def _tap_widths(w: LayerWeights) -> dict[str, int]:
    return {TAPS[role]: w.linears[role].shape[0] for role in ROLES}


def _layer_session(spec: DecoderSpec, i: int, w: LayerWeights, *, taps: bool, context_length: int):
    """Layer ``i``'s session, its ModelProto dropped once ORT has its own copy (a layer of an 8B model: 0.87 GB)."""
    return session(layer_model(spec, i, w, taps=taps, context_length=context_length))


def _run_layer(sess, hidden: np.ndarray, stats: dict[str, InputStats] | None) -> np.ndarray:
    """``hidden`` [windows, S, H] through one layer, one window at a time; accumulate the taps into ``stats``."""
    taps = sorted(stats) if stats else []
    out = np.empty_like(hidden)
    mask = np.ones((1, hidden.shape[1]), np.int64)
    for w in range(len(hidden)):
        values = sess.run(["hidden_states_out", *taps], {"hidden_states": hidden[w:w + 1], "attention_mask": mask})
        out[w] = values[0][0]
        for tap, v in zip(taps, values[1:]):
            stats[tap].add(v)
    return out


def _layer_stats(spec: DecoderSpec, i: int, w: LayerWeights, hidden: np.ndarray,
                 context_length: int) -> tuple[np.ndarray, dict]:
    stats = {tap: InputStats.empty(k) for tap, k in _tap_widths(w).items()}
    return _run_layer(_layer_session(spec, i, w, taps=True, context_length=context_length), hidden, stats), stats


def _embedded(spec: DecoderSpec, source: TensorSource, *windows: np.ndarray) -> list[np.ndarray]:
    """Each set of windows' embeddings, the table read once (a 1B model's is 1 GB in FP32) and dropped."""
    table = embedding_table(source)
    return [embed(spec, table, ids) for ids in windows]


def _rms(x: np.ndarray, gamma: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps) * gamma).astype(np.float32)


def measure(spec: DecoderSpec, source: TensorSource, calibration: np.ndarray, evaluation: np.ndarray | None, *,
            context_length: int, block_size: int, symmetric: bool, sensitivities: bool = True,
            reference_dir: Path | None = None, progress: Progress = QUIET) -> Measured:
    """Pass 1: every linear layer's facts (shape, K/V cache, INT4 RTN relative output error) and the reference
    (``evaluation`` None: the facts alone, as another block size's sensitivities need them).
    ``context_length`` is the package's (it sizes the rotary caches and picks LongRoPE's factors)."""
    cal, ev = _embedded(spec, source, calibration, calibration[:0] if evaluation is None else evaluation)
    facts: list[LinearFacts] = []
    sizes: dict[str, tuple[int, int]] = {EMBEDDING: (int(np.prod(source.shape(EMBEDDING))), 4)}
    for i in range(spec.num_layers):
        w = layer_weights(spec, source, i)
        cal, stats = _layer_stats(spec, i, w, cal, context_length)
        if evaluation is not None:
            ev = _run_layer(_layer_session(spec, i, w, taps=False, context_length=context_length), ev, None)
        for role in ROLES:
            weight = w.linears[role]
            s = sensitivity(weight, stats[TAPS[role]].hessian, block_size, symmetric) if sensitivities else None
            facts.append(LinearFacts(linear_name(i, role), weight_name(i, role), None, *weight.shape, None,
                                     "FLOAT", f"present.{i}.key" if role == "qkv" else None, s))
            sizes[weight_name(i, role)] = (weight.size, 4)
        for name, values in [*w.norms.items(), *w.biases.items()]:
            sizes[f"model.layers.{i}.{name}"] = (values.size, 4)
        del w, stats
        progress.step("measured layer", i + 1, spec.num_layers)
    final_norm = final_norm_weight(spec, source)
    sizes["model.norm.weight"] = (final_norm.size, 4)
    head = head_weight(spec, source)
    head_stats = InputStats.empty(head.shape[0])
    head_stats.add(_rms(cal, final_norm, spec.norm_eps))
    # the tied head stays on the FP16 table by default: its (minute-long) sensitivity is measured only when untied
    s = sensitivity(head, head_stats.hessian, block_size, symmetric) if sensitivities and not spec.tied else None
    # a tied head is the embedding table read through a transpose: the policy keeps it unless told to quantize a copy
    facts.append(LinearFacts(linear_name(None, HEAD), EMBEDDING if spec.tied else HEAD,
                             "transpose" if spec.tied else None, *head.shape, EMBEDDING if spec.tied else None,
                             "FLOAT", None, s))
    if not spec.tied:
        sizes[HEAD] = (head.size, 4)
    # numpy, a block of the vocabulary at a time: no session copy of the head (an 8B model's is 2.1 GB in FP32)
    reference = None if evaluation is None else ReferenceLogits.from_logprobs(
        evaluation, (log_softmax(head_logits(spec, final_norm, head, ev[k]), np.float32)
                     for k in range(len(ev))), directory=reference_dir, progress=progress)
    del head
    return Measured(Int4Facts(tuple(facts), sizes), reference, head_stats.hessian)


# output channels quantized at a time: GPTQ, RTN and the scale refit treat each channel alone (given the Hessian), so
# a wide head is quantized in column chunks with the same result; whole, an 8B model's untied head [4096, 128256]
# took the export to 14.0 GB peak RSS (RTN), 2.85 GB over its inputs in chunks. Decoder layers up to 1B are narrower
# (one chunk: unchanged).
QUANTIZE_COLUMNS = 8192


def quantize_linear(weight: np.ndarray, hessian: np.ndarray, bits: int, settings: QuantSettings) -> QuantizedLinear:
    """One [K, N] weight at ``bits`` (the plan's 4 or 8) as MatMulNBits stores it, with FP32 scales."""
    if bits not in (BITS, PROMOTED_BITS):
        raise ValueError(f"{bits} bits planned; MatMulNBits here writes {BITS} or {PROMOTED_BITS}")
    if weight.shape[1] > QUANTIZE_COLUMNS:
        return _stacked([quantize_linear(np.ascontiguousarray(weight[:, c:c + QUANTIZE_COLUMNS]), hessian, bits,
                                         settings) for c in range(0, weight.shape[1], QUANTIZE_COLUMNS)])
    s = settings
    if s.method == "gptq":
        bq = quantize_gptq(weight, hessian, s.block_size, s.symmetric, s.clip, s.damp, False, bits, s.refits)
    else:
        bq = quantize_rtn(weight, s.block_size, s.symmetric, s.clip, np.diag(hessian), bits)
        if s.refits:
            bq = refit_scales(bq, weight, hessian)
    b, scales, zp = pack_matmulnbits(bq, np.float32)
    return QuantizedLinear(b, scales, zp, weight.shape[0], weight.shape[1], bits, s.block_size, s.accuracy_level)


def quantized_layers(spec: DecoderSpec, source: TensorSource, hidden: np.ndarray,
                     plan: dict[str, Int4Decision], settings: QuantSettings, *, context_length: int,
                     store: QuantizedStore | None = None, progress: Progress = QUIET) -> Iterator[LayerWeights]:
    """Pass 2: each layer with its planned roles quantized (the others as float), one at a time, in order.
    ``hidden``: the calibration windows' embeddings (``embed``; the caller holds the table for the writer anyway).
    A linear ``store`` holds is taken from it: no Hessian for a layer whose quantized linears are all stored, and no
    forward after the last layer that needs one."""
    def key(i: int, role: str) -> tuple[str, int, QuantSettings]:
        return linear_name(i, role), plan[linear_name(i, role)].bits, settings

    todo = {i for i in range(spec.num_layers) for role in ROLES
            if plan[linear_name(i, role)].quantize and (store is None or key(i, role) not in store)}
    last = max(todo, default=-1)
    cal = hidden
    for i in range(spec.num_layers):
        w = layer_weights(spec, source, i)
        stats: dict = {}
        if i in todo:
            cal, stats = _layer_stats(spec, i, w, cal, context_length)
        elif i < last:  # the same graph as a fresh pass 2 runs (its taps unread): the same hidden states
            cal = _run_layer(_layer_session(spec, i, w, taps=True, context_length=context_length), cal, None)
        linears = {}
        for role in ROLES:
            d = plan[linear_name(i, role)]
            linears[role] = w.linears[role] if not d.quantize else _stored(
                store, key(i, role), lambda: quantize_linear(w.linears[role], stats[TAPS[role]].hessian, d.bits,
                                                             settings))
        del stats
        yield replace(w, linears=linears)
        progress.step("quantized layer", i + 1, spec.num_layers)


def quantized_head(spec: DecoderSpec, source: TensorSource, measured: Measured, plan: dict[str, Int4Decision],
                   settings: QuantSettings, store: QuantizedStore | None = None) -> QuantizedLinear | np.ndarray | None:
    """The head as the writer takes it: None (kept on the tied embedding table), or a separate head as planned
    (an untied one, or a tied one the profile quantizes: a second, quantized copy of the table)."""
    d = plan[linear_name(None, HEAD)]
    if spec.tied and not d.quantize:
        return None
    head = head_weight(spec, source)
    if not d.quantize:
        return head
    return _stored(store, (HEAD, d.bits, settings),
                   lambda: quantize_linear(head, measured.head_hessian, d.bits, settings))


def quantized_table(table: np.ndarray, settings: QuantSettings) -> QuantizedLinear:
    """An untied embedding table [vocab, hidden] at 8 bits, as the [hidden, vocab] weight MatMulNBits would take
    (GatherBlockQuantized reads rows of it): round to nearest with the clip search, a chunk of rows at a time (no
    calibration statistics: a lookup has no input to weigh the error by)."""
    def rows(r: int) -> QuantizedLinear:
        chunk = np.ascontiguousarray(table[r:r + QUANTIZE_COLUMNS].T)
        bq = quantize_rtn(chunk, settings.block_size, settings.symmetric, clip=True, bits=PROMOTED_BITS)
        return QuantizedLinear(*pack_matmulnbits(bq, np.float32), *chunk.shape, PROMOTED_BITS, settings.block_size,
                               settings.accuracy_level)
    return _stacked([rows(r) for r in range(0, len(table), QUANTIZE_COLUMNS)])


def _stacked(parts: list[QuantizedLinear]) -> QuantizedLinear:
    """Column chunks of one weight as one: MatMulNBits' inputs lead with N, so the chunks stack on it."""
    if len(parts) == 1:
        return parts[0]
    zero_points = None if parts[0].zero_points is None else np.concatenate([p.zero_points for p in parts])
    return replace(parts[0], b=np.concatenate([p.b for p in parts]), scales=np.concatenate([p.scales for p in parts]),
                   zero_points=zero_points, n=sum(p.n for p in parts))


def package_embedding(table: np.ndarray, precision: str, settings: QuantSettings, *, tied: bool,
                      head: Weight | None) -> Weight:
    """The table as the package stores it (llm.embedding_precision): FP16, FP32, or 8-bit. An 8-bit table under a
    tied head is that head's own codes (the policy plans a tied head at 8 bits when the table is): one copy."""
    if precision == "fp16":
        return table.astype(np.float16)
    if precision != "int8":
        return table
    if not tied:
        return quantized_table(table, settings)
    if not (isinstance(head, QuantizedLinear) and head.bits == PROMOTED_BITS):
        raise EdgeqError("an 8-bit embedding table whose tied head is not planned at 8 bits",
                         "this is an edgeq bug: the policy plans a tied head at 8 bits when the table is")
    return head


def write_quantized(spec: DecoderSpec, source: TensorSource, calibration: np.ndarray, measured: Measured,
                    plan: Iterable[Int4Decision], settings: QuantSettings, folder: Path, *, embedding_precision: str,
                    context_length: int, generation_config: dict | None, store: QuantizedStore | None = None,
                    progress: Progress = QUIET) -> Path:
    """Pass 2 into ``folder``: the decoder with ``plan``'s layers quantized, written layer by layer (model.onnx,
    model.onnx.data, genai_config.json); ``calibration``: the windows' token ids."""
    by_node = {d.node: d for d in plan}
    if store is not None:
        store.writing(folder)
    head = quantized_head(spec, source, measured, by_node, settings, store)
    table = embedding_table(source)  # read once: the calibration embeddings, then the package's table
    hidden = embed(spec, table, calibration)
    embedding = package_embedding(table, embedding_precision, settings, tied=spec.tied, head=head)
    del table
    layers = quantized_layers(spec, source, hidden, by_node, settings, context_length=context_length, store=store,
                              progress=progress)
    return write_decoder(spec, folder, embedding, layers, final_norm_weight(spec, source), head,
                         context_length=context_length, generation_config=generation_config)
