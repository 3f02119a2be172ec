"""The decoder as ONNX in ONNX Runtime's fused contrib ops, built one layer at a time.

Every layer is the same node sequence (``_layer``): RMSNorm (SimplifiedLayerNormalization, or the Skip form that
also adds the previous residual branch), one MatMul or MatMulNBits per role, GroupQueryAttention with the rotary
caches (``do_rotary``; none on a NoPE layer), ``local_window_size`` on sliding layers, and a gated SiLU/GELU-tanh
MLP. Two products share it:

* ``layer_model``: one layer alone (hidden_states, attention_mask -> hidden_states_out, plus each linear's input as
  a ``tap/<role>`` output), which layerwise calibration runs in ONNX Runtime;
* ``write_decoder``: the whole onnxruntime-genai decoder, each tensor appended to ``model.onnx.data`` as the layer
  that owns it is built, so memory holds one layer, not the model. Same inputs give the same bytes.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.decoder.layers import LayerWeights, QuantizedLinear, Weight, layer_weights, read_tensor
from edgeq.decoder.rope import rotary_caches
from edgeq.decoder.spec import DecoderSpec
from edgeq.decoder.weights import TensorSource
from edgeq.errors import EdgeqError, UserInputError
from edgeq.llm.genai import GENAI_CONFIG, decoder_io, genai_config
from edgeq.policy.causal_lm import HEAD_NAME

MS = "com.microsoft"
OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)]
IR_VERSION = 10
MODEL_FILE, DATA_FILE = "model.onnx", "model.onnx.data"
SEQLENS, TOTAL = "edgeq/gqa/seqlens_k", "edgeq/gqa/total_sequence_length"
TAPS = ("qkv", "o", "gate_up", "down")
# A tensor of at least BIG bytes starts at a multiple of PAGE in model.onnx.data, so ONNX Runtime can map it from the
# file instead of copying it; 64 KiB is Windows' mapping granularity and covers 4 and 16 KiB pages (Android).
BIG, PAGE, SMALL_ALIGN = 1 << 20, 1 << 16, 64
PROTO_LIMIT = 2**31 - (64 << 20)  # protobuf's 2 GiB, less room for the graph and the other tensors
# QuantizedLinear lives in layers (LayerWeights holds it) and is re-exported here, where the graph consumes it
__all__ = ["QuantizedLinear", "embed", "head_logits", "head_model", "layer_model", "write_decoder",
           "write_fp32_decoder"]


def _seqlens_nodes(seqlens: str, total: str) -> list[onnx.NodeProto]:
    """seqlens_k = ReduceSum(attention_mask, 1) - 1 (int32), total_sequence_length = Shape(attention_mask)[1]."""
    p = "edgeq/gqa/"
    one = helper.make_tensor(p + "one", TensorProto.INT64, [], [1])
    axes = helper.make_tensor(p + "axes", TensorProto.INT64, [1], [1])
    return [
        helper.make_node("Constant", [], [p + "axis1"], value=axes, name=p + "Constant_axes"),
        helper.make_node("Constant", [], [p + "one_i64"], value=one, name=p + "Constant_one"),
        helper.make_node("ReduceSum", ["attention_mask", p + "axis1"], [p + "mask_sum"], keepdims=0,
                         name=p + "ReduceSum"),
        helper.make_node("Sub", [p + "mask_sum", p + "one_i64"], [p + "seqlens_k_i64"], name=p + "Sub"),
        helper.make_node("Cast", [p + "seqlens_k_i64"], [seqlens], to=TensorProto.INT32, name=p + "Cast_seqlens"),
        helper.make_node("Shape", ["attention_mask"], [p + "mask_shape"], name=p + "Shape"),
        helper.make_node("Gather", [p + "mask_shape", p + "one_i64"], [p + "total_i64"], axis=0,
                         name=p + "Gather"),
        helper.make_node("Cast", [p + "total_i64"], [total], to=TensorProto.INT32, name=p + "Cast_total"),
    ]


class _InlineTensors:
    """Initializers held in the model proto (one layer's worth: layer_model, head_model)."""

    def __init__(self) -> None:
        self.protos: list[TensorProto] = []

    def add(self, name: str, array: np.ndarray) -> str:
        self.protos.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name


class _DataFile:
    """Initializers appended to one external data file as they come; the proto keeps only offset and length."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "wb")
        self.offset = 0
        self.protos: list[TensorProto] = []

    def _start(self, nbytes: int) -> int:
        pad = -self.offset % (PAGE if nbytes >= BIG else SMALL_ALIGN)
        if pad:
            self.file.write(b"\0" * pad)
            self.offset += pad
        return self.offset

    def add(self, name: str, array: np.ndarray) -> str:
        return self.add_chunks(name, array.dtype, array.shape, [array])

    def add_chunks(self, name: str, dtype: np.dtype, shape: tuple[int, ...], chunks: Iterable[np.ndarray]) -> str:
        """A tensor written from consecutive pieces of its row-major bytes (a transposed table, block by block)."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        start = self._start(nbytes)
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk, dtype=dtype.newbyteorder("<"))
            self.file.write(chunk.data)
            self.offset += chunk.nbytes
        if self.offset - start != nbytes:
            raise EdgeqError(f"tensor {name} wrote {self.offset - start} bytes, its shape needs {nbytes}",
                             "this is an edgeq bug; please report it")
        proto = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(dtype), dims=list(shape),
                            data_location=TensorProto.EXTERNAL)
        for key, value in (("location", self.path.name), ("offset", str(start)), ("length", str(nbytes))):
            proto.external_data.add(key=key, value=value)
        self.protos.append(proto)
        return name

    def close(self) -> None:
        self.file.close()


@dataclass
class _Builder:
    """Nodes and initializers of the graph being built."""

    tensors: _InlineTensors | _DataFile
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    # weak: holding every layer's codes here kept a whole 8B model's (4.6 GB) in memory until the file was written
    quantized_inputs: dict[str, tuple[weakref.ref[QuantizedLinear], list[str]]] = field(default_factory=dict)

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int | list[str] = 1, domain: str = "",
           **attrs) -> list[str]:
        outs = [f"{name}/output_{k}" for k in range(outputs)] if isinstance(outputs, int) else outputs
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=name, domain=domain, **attrs))
        return outs

    def const(self, name: str, array: np.ndarray) -> str:
        return self.tensors.add(name, array)

    def ints(self, name: str, values: list[int]) -> str:
        """A small int64 vector as a Constant node in the graph (shape inference must read it: never external)."""
        return self.op("Constant", [], f"/{name}/Constant", outputs=[name],
                       value=numpy_helper.from_array(np.array(values, np.int64), name))[0]

    def quantized(self, w: QuantizedLinear, name: str) -> list[str]:
        """MatMulNBits' constant inputs for ``w`` as ``name``; the second reader of the same weight (a tied head and
        the embedding lookup that shares its codes) gets the same initializers, not a second copy."""
        if name in self.quantized_inputs:
            if self.quantized_inputs[name][0]() is not w:
                raise EdgeqError(f"two different quantized weights are named {name}", "this is an edgeq bug")
            return self.quantized_inputs[name][1]
        inputs = [self.const(f"{name}.weight_Q{w.bits}", w.b), self.const(f"{name}.weight_scales", w.scales)]
        if w.zero_points is not None:
            inputs.append(self.const(f"{name}.weight_zp", w.zero_points))
        self.quantized_inputs[name] = (weakref.ref(w), inputs)
        return inputs

    def gather_quantized(self, table: QuantizedLinear, name: str, ids: str, hidden: int, prefix: str) -> str:
        """Rows ``ids`` of an 8-bit table stored as MatMulNBits stores a [hidden, vocab] weight (B [vocab, blocks,
        block]) -> float32 [batch, seq, hidden]. GatherBlockQuantized reads B as it is; its scales and zero points
        are viewed as [vocab, blocks, 1] (a Reshape of an initializer, which ONNX Runtime folds at load: a copy of
        the scales only, 1/8 of the codes' bytes at block 32)."""
        if table.bits != 8:
            raise EdgeqError(f"a quantized embedding table at {table.bits} bits: MatMulNBits packs 4-bit zero points "
                             "two blocks to a byte, GatherBlockQuantized one", "this is an edgeq bug")
        codes, scales, *zero_points = self.quantized(table, name)
        blocks = table.b.shape[1]
        view = self.ints(f"{name}.gather_view", [table.n, blocks, 1])
        inputs = [codes, ids, self.op("Reshape", [scales, view], f"{prefix}/Reshape_scales")[0]]
        if zero_points:
            inputs.append(self.op("Reshape", [zero_points[0], view], f"{prefix}/Reshape_zero_points")[0])
        (rows,) = self.op("GatherBlockQuantized", inputs, f"{prefix}/GatherBlockQuantized", domain=MS, bits=8,
                          block_size=table.block_size, gather_axis=0, quantize_axis=2)
        (x,) = self.op("Reshape", [rows, self.ints(f"{name}.gather_rows", [0, 0, -1])], f"{prefix}/Reshape_rows")
        if blocks * table.block_size != hidden:  # the last block's padding
            start, stop = self.ints(f"{name}.gather_start", [0]), self.ints(f"{name}.gather_stop", [hidden])
            (x,) = self.op("Slice", [x, start, stop, self.ints(f"{name}.gather_axis", [-1])], f"{prefix}/Slice")
        return x

    def linear(self, x: str, w: Weight, bias: np.ndarray | None, name: str) -> str:
        if isinstance(w, QuantizedLinear):
            inputs = [x, *self.quantized(w, name)]
            (y,) = self.op("MatMulNBits", inputs, f"/{name}/MatMulNBits", domain=MS, K=w.k, N=w.n, bits=w.bits,
                           block_size=w.block_size, accuracy_level=w.accuracy_level)
        else:
            (y,) = self.op("MatMul", [x, self.const(f"{name}.weight", np.asarray(w, np.float32))], f"/{name}/MatMul")
        if bias is not None:
            (y,) = self.op("Add", [y, self.const(f"{name}.bias", bias)], f"/{name}/Add")
        return y

    def norm(self, x: str, weight: np.ndarray, name: str, eps: float) -> str:
        return self.op("SimplifiedLayerNormalization", [x, self.const(f"{name}.weight", weight)], f"/{name}/Norm",
                       axis=-1, epsilon=eps, stash_type=1)[0]

    def skip_norm(self, x: str, delta: str, weight: np.ndarray, name: str, eps: float) -> tuple[str, str]:
        """(RMSNorm(x + delta), x + delta)."""
        normed, _, _, total = self.op("SkipSimplifiedLayerNormalization",
                                      [x, delta, self.const(f"{name}.weight", weight)], f"/{name}/SkipNorm",
                                      outputs=[f"/{name}/output_0", "", "", f"/{name}/output_3"], domain=MS,
                                      epsilon=eps)
        return normed, total


@dataclass(frozen=True)
class _Attention:
    """What a layer's GroupQueryAttention reads and writes besides q/k/v."""

    past_key: str = ""
    past_value: str = ""
    present_key: str = ""
    present_value: str = ""
    caches: Mapping[int, tuple[str, str]] = field(default_factory=dict)  # rotary table index -> (cos, sin)


def _layer(b: _Builder, spec: DecoderSpec, w: LayerWeights, x: str, pending: str | None, io: _Attention,
           taps: dict[str, str]) -> tuple[str, str]:
    """Layer ``w.index`` on residual stream ``x`` (+ the previous layer's unadded branch ``pending``): returns the
    residual and this layer's MLP branch, left unadded so the next norm fuses the add (SkipSimplified...)."""
    i, eps = w.index, spec.norm_eps
    p = f"model.layers.{i}"
    if pending is None:
        h, residual = b.norm(x, w.norms["attn_in"], f"{p}.input_layernorm", eps), x
    else:
        h, residual = b.skip_norm(x, pending, w.norms["attn_in"], f"{p}.input_layernorm", eps)
    taps["qkv"] = h
    attn_out = _attention(b, spec, w, h, io, f"{p}.attn")
    taps["o"] = attn_out
    delta = b.linear(attn_out, w.linears["o"], w.biases.get("o"), f"{p}.attn.o_proj")
    if "attn_out" in w.norms:
        delta = b.norm(delta, w.norms["attn_out"], f"{p}.post_attention_layernorm", eps)
    h, residual = b.skip_norm(residual, delta, w.norms["mlp_in"], f"{p}.pre_mlp_layernorm", eps)
    taps["gate_up"] = h
    gate = b.linear(h, w.linears["gate"], w.biases.get("gate"), f"{p}.mlp.gate_proj")
    up = b.linear(h, w.linears["up"], w.biases.get("up"), f"{p}.mlp.up_proj")
    if spec.activation == "silu":
        (sig,) = b.op("Sigmoid", [gate], f"/{p}/mlp/act/Sigmoid")
        (act,) = b.op("Mul", [gate, sig], f"/{p}/mlp/act/Mul")
    else:  # Gelu (opset 20): "tanh" as gelu_pytorch_tanh, "none" the exact erf form
        (act,) = b.op("Gelu", [gate], f"/{p}/mlp/act/Gelu",
                      approximate="tanh" if spec.activation == "gelu_tanh" else "none")
    (hidden,) = b.op("Mul", [act, up], f"/{p}/mlp/Mul")
    taps["down"] = hidden
    delta = b.linear(hidden, w.linears["down"], w.biases.get("down"), f"{p}.mlp.down_proj")
    if "mlp_out" in w.norms:
        delta = b.norm(delta, w.norms["mlp_out"], f"{p}.post_feedforward_layernorm", eps)
    return residual, delta


def _attention(b: _Builder, spec: DecoderSpec, w: LayerWeights, h: str, io: _Attention, p: str) -> str:
    qkv = b.linear(h, w.linears["qkv"], w.biases.get("qkv"), f"{p}.qkv_proj")
    if spec.qk_norm:  # per-head RMSNorm of q and k before rotary: split, view as [b, s, heads, d], norm, view back
        sizes = b.ints(f"{p}.qkv_split", [spec.q_size, spec.kv_size, spec.kv_size])
        q, k, v = b.op("Split", [qkv, sizes], f"/{p}/qkv/Split", outputs=3, axis=-1)
        heads_shape = b.ints(f"{p}.heads_shape", [0, 0, -1, spec.head_dim])
        flat_shape = b.ints(f"{p}.flat_shape", [0, 0, -1])
        normed = []
        for name, t in (("q", q), ("k", k)):
            (t4,) = b.op("Reshape", [t, heads_shape], f"/{p}/{name}_norm/Reshape_in")
            t4 = b.norm(t4, w.norms[name], f"{p}.{name}_norm", spec.norm_eps)
            normed.append(b.op("Reshape", [t4, flat_shape], f"/{p}/{name}_norm/Reshape_out")[0])
        qkv_inputs = [normed[0], normed[1], v]
    else:
        qkv_inputs = [qkv, "", ""]
    table = spec.layer_rotary[w.index]
    cos, sin = io.caches[table] if table is not None else ("", "")
    window = spec.layer_window[w.index]
    attrs = dict(num_heads=spec.heads, kv_num_heads=spec.kv_heads, scale=spec.attention_scale,
                 do_rotary=int(table is not None), rotary_interleaved=0)
    if window:  # both transformers and GQA (measured) attend to the last `window` keys, the query's own included
        attrs["local_window_size"] = window
    if spec.attention_softcap:
        attrs["softcap"] = spec.attention_softcap
    (out, _, _) = b.op("GroupQueryAttention", qkv_inputs + [io.past_key, io.past_value, SEQLENS, TOTAL, cos, sin],
                       f"/{p}/GroupQueryAttention", domain=MS,
                       outputs=[f"/{p}/GroupQueryAttention/output_0", io.present_key or f"/{p}/present_key",
                                io.present_value or f"/{p}/present_value"], **attrs)
    return out


def _caches(b: _Builder, spec: DecoderSpec, layers: Iterable[int], context_length: int) -> dict[int, tuple[str, str]]:
    used = sorted({spec.layer_rotary[i] for i in layers} - {None})
    names = {}
    for t in used:
        cos, sin = rotary_caches(spec.rotary[t], context_length)
        names[t] = (b.const(f"rotary.{t}.cos_cache", cos), b.const(f"rotary.{t}.sin_cache", sin))
    return names


def _float_info(name: str, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _model(b: _Builder, name: str, inputs: list, outputs: list) -> onnx.ModelProto:
    graph = helper.make_graph(b.nodes, name, inputs, outputs, initializer=b.tensors.protos)
    return helper.make_model(graph, opset_imports=OPSETS, ir_version=IR_VERSION, producer_name="edgeq")


def layer_model(spec: DecoderSpec, i: int, weights: LayerWeights, *, taps: bool = False,
                context_length: int | None = None) -> onnx.ModelProto:
    """Decoder layer ``i`` alone: ``hidden_states`` [batch, seq, hidden] float32 and ``attention_mask`` [batch,
    seq] int64 (a prompt, no past; rows of different lengths padded on the right: GroupQueryAttention reads a row's
    length from its mask, and left padding shifts its positions) -> ``hidden_states_out``; with ``taps`` also
    ``tap/qkv``, ``tap/o``, ``tap/gate_up``, ``tap/down`` (the input of each linear role). ``context_length`` is
    the package's, as given to write_decoder: it sizes the rotary caches (sequences must not be longer) and picks
    LongRoPE's factors (default: the longest context a package can have, ``spec.max_context``)."""
    if weights.index != i:
        raise EdgeqError(f"layer_model({i}) was given layer {weights.index}'s weights", "this is an edgeq bug")
    context_length = context_length or spec.max_context
    b = _Builder(_InlineTensors())
    b.nodes.extend(_seqlens_nodes(SEQLENS, TOTAL))
    io = _Attention(caches=_caches(b, spec, [i], context_length))
    tapped: dict[str, str] = {}
    residual, delta = _layer(b, spec, weights, "hidden_states", None, io, tapped)
    b.op("Add", [residual, delta], f"/model.layers.{i}/residual/Add", outputs=["hidden_states_out"])
    outputs = [_float_info("hidden_states_out", ["batch", "sequence", spec.hidden])]
    if taps:
        for role in TAPS:
            b.op("Identity", [tapped[role]], f"/tap/{role}/Identity", outputs=[f"tap/{role}"])
            outputs.append(_float_info(f"tap/{role}", ["batch", "sequence", None]))
    inputs = [_float_info("hidden_states", ["batch", "sequence", spec.hidden]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])]
    return _model(b, f"edgeq_layer_{i}", inputs, outputs)


def _head(b: _Builder, spec: DecoderSpec, x: str, pending: str | None, final_norm: np.ndarray, head: str | Weight,
          fp16_head: bool = False) -> None:
    """Final RMSNorm, lm_head, soft-cap: writes graph tensor ``logits``. ``head`` is a weight, or the name of the
    tied table's transpose (``fp16_head``: an FP16 table)."""
    if pending is None:
        h = b.norm(x, final_norm, "model.norm", spec.norm_eps)
    else:
        h, _ = b.skip_norm(x, pending, final_norm, "model.norm", spec.norm_eps)
    if isinstance(head, str) and fp16_head:  # the FP16 table's transpose: FP16 MatMul, activations cast in and out
        (h16,) = b.op("Cast", [h], "/lm_head/Cast_to_fp16", to=TensorProto.FLOAT16)
        (l16,) = b.op("MatMul", [h16, head], "/lm_head/MatMul")
        (logits,) = b.op("Cast", [l16], "/lm_head/Cast_to_fp32", to=TensorProto.FLOAT)
    elif isinstance(head, str):
        (logits,) = b.op("MatMul", [h, head], "/lm_head/MatMul")
    else:
        logits = b.linear(h, head, None, HEAD_NAME)
    if spec.final_softcap:  # cap * tanh(logits / cap)
        cap = b.const("final_logit_softcap", np.array(spec.final_softcap, np.float32))
        (logits,) = b.op("Div", [logits, cap], "/lm_head/softcap/Div")
        (logits,) = b.op("Tanh", [logits], "/lm_head/softcap/Tanh")
        b.op("Mul", [logits, cap], "/lm_head/softcap/Mul", outputs=["logits"])
    else:
        b.op("Identity", [logits], "/lm_head/Identity", outputs=["logits"])


def head_model(spec: DecoderSpec, final_norm: np.ndarray, head_weight: Weight) -> onnx.ModelProto:
    """The model's end alone: ``hidden_states`` (the last layer's output) -> final norm -> lm_head -> soft-cap ->
    ``logits`` float32. ``head_weight`` is [hidden, vocab] (the embedding table transposed when tied). A model proto
    holds at most 2 GB: a bigger FP32 head (Llama-3.1-8B's is 2.1 GB) is refused; ``head_logits`` computes it."""
    if isinstance(head_weight, np.ndarray) and head_weight.size * 4 > PROTO_LIMIT:
        raise EdgeqError(f"the FP32 lm_head ({head_weight.size * 4 / 2**30:.1f} GiB) does not fit one ONNX model "
                         "proto (2 GiB)", "compute the reference logits with edgeq.decoder.graph.head_logits")
    b = _Builder(_InlineTensors())
    _head(b, spec, "hidden_states", None, final_norm, head_weight)
    return _model(b, "edgeq_head", [_float_info("hidden_states", ["batch", "sequence", spec.hidden])],
                  [_float_info("logits", ["batch", "sequence", spec.vocab])])


def head_logits(spec: DecoderSpec, final_norm: np.ndarray, head_weight: np.ndarray, hidden: np.ndarray,
                vocab_block: int = 16384) -> np.ndarray:
    """What ``head_model`` computes, in numpy, for a head of any size: RMSNorm, then the logits a block of the
    vocabulary at a time (memory: the logits plus one block's product), then the soft-cap."""
    x = np.asarray(hidden, np.float32)
    variance = np.mean(np.square(x), axis=-1, keepdims=True, dtype=np.float32)
    h = (x / np.sqrt(variance + np.float32(spec.norm_eps)) * final_norm).astype(np.float32)
    logits = np.empty((*h.shape[:-1], head_weight.shape[1]), np.float32)
    for v in range(0, head_weight.shape[1], vocab_block):
        logits[..., v:v + vocab_block] = h @ np.asarray(head_weight[:, v:v + vocab_block], np.float32)
    if spec.final_softcap:
        cap = np.float32(spec.final_softcap)
        logits = (np.tanh(logits / cap) * cap).astype(np.float32)
    return logits


def embed(spec: DecoderSpec, source: TensorSource | np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Embedding rows of int64 ``ids`` [batch, seq] -> float32 [batch, seq, hidden], Gemma's scale applied.
    ``source`` is a checkpoint (its table is read once) or the table itself."""
    table = source if isinstance(source, np.ndarray) else embedding_table(source)
    rows = np.asarray(table[np.asarray(ids, np.int64)], np.float32)
    return rows * np.float32(spec.embedding_scale) if spec.embedding_scale != 1.0 else rows


def embedding_table(source: TensorSource) -> np.ndarray:
    return read_tensor(source, "model.embed_tokens.weight")


def final_norm_weight(spec: DecoderSpec, source: TensorSource) -> np.ndarray:
    return (read_tensor(source, "model.norm.weight") + np.float32(spec.norm_offset)).astype(np.float32)


def head_weight(spec: DecoderSpec, source: TensorSource) -> np.ndarray:
    """lm_head as [hidden, vocab] float32 (the embedding table transposed when the head is tied)."""
    name = "model.embed_tokens.weight" if spec.tied else "lm_head.weight"
    return np.ascontiguousarray(read_tensor(source, name).T)


def _decoder_io(spec: DecoderSpec) -> tuple[list, list]:
    kv = ["batch_size", spec.kv_heads, "past_sequence_length", spec.head_dim]
    present = ["batch_size", spec.kv_heads, "total_sequence_length", spec.head_dim]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"])]
    outputs = [_float_info("logits", ["batch_size", "sequence_length", spec.vocab])]
    for i in range(spec.num_layers):
        inputs += [_float_info(f"past_key_values.{i}.key", kv), _float_info(f"past_key_values.{i}.value", kv)]
        outputs += [_float_info(f"present.{i}.key", present), _float_info(f"present.{i}.value", present)]
    return inputs, outputs


def write_decoder(spec: DecoderSpec, out_dir: Path, embedding: Weight, layers: Iterable[LayerWeights],
                  final_norm: np.ndarray, head: Weight | None = None, *, context_length: int,
                  generation_config: dict | None = None) -> Path:
    """Write ``out_dir/model.onnx`` (graph only), ``model.onnx.data`` (every tensor, appended layer by layer as
    ``layers`` yields them) and ``genai_config.json``; returns the model path. ``embedding`` is the [vocab, hidden]
    FP16 or FP32 table, or an 8-bit table quantized as the [hidden, vocab] weight MatMulNBits takes; ``head`` None
    means tied to a float table (read through a transpose); a tied head on a quantized table is that same object
    (one copy of the codes serves lookup and head)."""
    if isinstance(embedding, QuantizedLinear) and head is None:
        raise EdgeqError("a tied head on a quantized embedding table was not given the table",
                         "this is an edgeq bug: pass the quantized table as the head too")
    if not 1 <= context_length <= spec.max_context:
        raise UserInputError(f"context length {context_length} is outside 1..{spec.max_context}, the longest this "
                             "model supports (max_position_embeddings, or a LongRoPE model's "
                             "original_max_position_embeddings)", f"choose a context length of at most "
                                                                  f"{spec.max_context}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = _DataFile(out_dir / DATA_FILE)
    try:
        b = _Builder(data)
        b.nodes.extend(_seqlens_nodes(SEQLENS, TOTAL))
        if isinstance(embedding, QuantizedLinear):
            table = HEAD_NAME if head is embedding else "model.embed_tokens"
            x = b.gather_quantized(embedding, table, "input_ids", spec.hidden, "/model/embed_tokens")
        else:
            table = b.const("model.embed_tokens.weight", embedding)
            (x,) = b.op("Gather", [table, "input_ids"], "/model/embed_tokens/Gather")
            if embedding.dtype != np.float32:
                (x,) = b.op("Cast", [x], "/model/embed_tokens/Cast", to=TensorProto.FLOAT)
        if spec.embedding_scale != 1.0:
            scale = b.const("model.embed_scale", np.array(spec.embedding_scale, np.float32))
            (x,) = b.op("Mul", [x, scale], "/model/embed_tokens/Mul")
        caches = _caches(b, spec, range(spec.num_layers), context_length)
        pending, count = None, 0
        for w in layers:
            if w.index != count:
                raise EdgeqError(f"write_decoder got layer {w.index} where layer {count} belongs",
                                 "this is an edgeq bug")
            io = _Attention(f"past_key_values.{count}.key", f"past_key_values.{count}.value",
                            f"present.{count}.key", f"present.{count}.value", caches)
            x, pending = _layer(b, spec, w, x, pending, io, {})
            count += 1
            del w
        if count != spec.num_layers:
            raise EdgeqError(f"write_decoder got {count} layers, the model has {spec.num_layers}",
                             "this is an edgeq bug")
        if head is None:  # tied: the lookup's own table read through a transpose, one copy in the file
            (head,) = b.op("Transpose", [table], "/lm_head/Transpose", perm=[1, 0])
        fp16_table = isinstance(embedding, np.ndarray) and embedding.dtype == np.float16
        _head(b, spec, x, pending, final_norm, head, fp16_head=fp16_table)
    finally:
        data.close()
    model = _model(b, "edgeq_decoder", *_decoder_io(spec))
    path = out_dir / MODEL_FILE
    onnx.save_model(model, str(path))
    _write_genai_config(spec, out_dir, model, generation_config, context_length)
    return path


def write_fp32_decoder(spec: DecoderSpec, source: TensorSource, out_dir: Path, *, context_length: int,
                       untie_head: bool = False, generation_config: dict | None = None) -> Path:
    """The source's decoder with every linear in float32, weights read a tensor at a time: the FP32 reference of
    ``edgeq eval``, and the fused FP32 graph bench peers quantize. ``untie_head``: a tied head gets its own float32
    copy of the table (a MatMul on an initializer, which weight quantizers take) instead of the table's transpose."""
    layers = (layer_weights(spec, source, i) for i in range(spec.num_layers))
    head = head_weight(spec, source) if untie_head or not spec.tied else None
    return write_decoder(spec, out_dir, embedding_table(source), layers, final_norm_weight(spec, source), head,
                         context_length=context_length, generation_config=generation_config)


def _write_genai_config(spec: DecoderSpec, out_dir: Path, model: onnx.ModelProto, generation_config: dict | None,
                        context_length: int) -> Path:
    """genai_config.json as edgeq.llm.genai writes it, with two differences: the sliding window no longer caps the
    context (this graph applies it), and model.type is the spec's own (the registry's lookup runs on a stand-in
    model type, so a spec read from a config the registry does not name, as in the builder's tests, packages too)."""
    view = {k: v for k, v in spec.config.items() if k != "sliding_window"} | {"model_type": "llama"}
    config = genai_config(MODEL_FILE, decoder_io(model), view, generation_config, context_length=context_length)
    config["model"]["type"] = spec.runtime_type
    path = out_dir / GENAI_CONFIG
    path.write_text(json.dumps(config, indent=4) + "\n")
    return path
