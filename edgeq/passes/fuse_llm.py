"""FuseLLM: rewrite an optimum-exported Llama-family decoder into ONNX Runtime's fused contrib ops.

The optimum export spells each block out in ~245 primitive nodes per layer, and per-node overhead, not arithmetic,
is what a small model's decode time goes to. Per decoder layer this pass rewrites RMSNorm into
``SimplifiedLayerNormalization``/``SkipSimplifiedLayerNormalization`` and the attention block into one MatMul over the
packed ``[Wq | Wk | Wv]`` weight plus one ``GroupQueryAttention`` (``do_rotary=1``, cos/sin caches from the model's
own rotary subgraph); the KV cache keeps optimum's names and BNSH layout, and ``position_ids`` is dropped. All ops
have kernels in the default CPU EP on x86-64 and ARM64. Every match is structural and checked; a layer that does not
match is left as it was and the summary says so. What it fuses per family is ``edgeq/families.py``'s ``fusion``
entry; the pass names no family. Assumes decoder-only, causal, no sliding window within the context, rotate_half
rotary over the whole head, no output-projection bias, right- or no padding.
Why not onnxscript's or ORT's fusions, and the measured equivalence to the unfused model (logits within 3e-5 of the
largest |logit|, checked by tests/llm/test_fuse_llm.py): see docs/decisions/llm-fusion.md.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.passes.base import PassBase, PassResult

MS_DOMAIN = "com.microsoft"
_PAST_RE = re.compile(r"past_key_values\.\d+\.(key|value)")


class _NoMatch(Exception):
    """A pattern did not match; the block is left unfused."""


@dataclass
class _Graph:
    """Producer/consumer index over a GraphProto, with constant lookup."""

    graph: onnx.GraphProto
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=lambda: collections.defaultdict(list))
    inits: dict[str, onnx.TensorProto] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reindex()

    def reindex(self) -> None:
        self.producer = {o: n for n in self.graph.node for o in n.output if o}
        self.consumers = collections.defaultdict(list)
        for n in self.graph.node:
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        self.inits = {t.name: t for t in self.graph.initializer}

    def const(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer, Constant node, or Identity of one), else None."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
                if a.name == "value_float":
                    return np.array(a.f, np.float32)
                if a.name == "value_int":
                    return np.array(a.i, np.int64)
                if a.name == "value_floats":
                    return np.array(a.floats, np.float32)
                if a.name == "value_ints":
                    return np.array(a.ints, np.int64)
            return None
        if node.op_type == "Identity":
            return self.const(node.input[0])
        return None

    def init_name(self, name: str) -> str | None:
        """The initializer a tensor is (directly or through Identity), else None."""
        while name not in self.inits:
            node = self.producer.get(name)
            if node is None or node.op_type != "Identity":
                return None
            name = node.input[0]
        return name

    def op(self, name: str, *op_types: str) -> onnx.NodeProto:
        node = self.producer.get(name)
        if node is None or node.op_type not in op_types:
            raise _NoMatch(f"{name!r} is not produced by {'/'.join(op_types)}")
        return node

    def scalar(self, name: str) -> float:
        value = self.const(name)
        if value is None or value.size != 1:
            raise _NoMatch(f"{name!r} is not a constant scalar")
        return float(value.reshape(()))


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of tensors whose element type is float32 (ONNX type inference on a copy without large weights)."""
    light = onnx.ModelProto(ir_version=model.ir_version)  # built field by field: no copy of the weights
    light.opset_import.extend(model.opset_import)
    g, lg = model.graph, light.graph
    lg.node.extend(g.node)
    lg.input.extend(g.input)
    lg.output.extend(g.output)
    for t in g.initializer:
        if int(np.prod(t.dims)) <= 4096:
            lg.initializer.append(t)
        else:  # keep its type and shape for inference, not its bytes
            lg.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False)
    typed = list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
    floats = {v.name for v in typed if v.type.tensor_type.elem_type == TensorProto.FLOAT}
    floats |= {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    return floats


def _rename_input(g: _Graph, old: str, new: str) -> None:
    for n in g.consumers.get(old, []):
        for k, i in enumerate(n.input):
            if i == old:
                n.input[k] = new


class FuseLLM(PassBase):
    """Fuse RMSNorm, residual + RMSNorm, and rotary grouped-query attention with KV cache into ORT contrib ops.

    ``max_positions`` sizes the rotary cos/sin caches (the model's ``max_position_embeddings``); onnxruntime-genai's
    ``context_length`` must not exceed it. ``pack_qkv`` merges the q/k/v projections into one MatMul feeding
    GroupQueryAttention's packed-QKV input (one weight-only-quantized kernel instead of three per layer).
    """

    def __init__(self, max_positions: int = 4096, pack_qkv: bool = True, untie_lm_head: bool = True) -> None:
        self.max_positions = max_positions
        self.pack_qkv = pack_qkv
        self.untie_lm_head = untie_lm_head
        self.counts: dict[str, int] = {}
        self.unfused: list[str] = []

    # ---------------------------------------------------------------- driver
    def call(self, model: onnx.ModelProto) -> PassResult:
        counts: dict[str, int] = collections.Counter()
        self.unfused = []
        nodes_before = len(model.graph.node)
        g = _Graph(model.graph)
        counts["Cast (no-op) removed"] = self._drop_noop_casts(model, g)
        g.reindex()
        counts.update(self._fuse_attention(model, g))
        g.reindex()
        counts.update(self._fuse_norms(g))
        if self.untie_lm_head:
            g.reindex()
            counts["lm_head untied"] = self._untie_lm_head(g)
        _dead_code_elimination(model)
        _topological_sort(model.graph)
        if counts["GroupQueryAttention"] or counts["SimplifiedLayerNormalization"] or counts[
                "SkipSimplifiedLayerNormalization"]:
            _ensure_opset(model, MS_DOMAIN, 1)
        counts = {k: v for k, v in counts.items() if v}
        self.counts = dict(counts)
        modified = bool(counts)
        ops_after = collections.Counter(n.op_type for n in model.graph.node)
        summary = (", ".join(f"{k}: {v}" for k, v in counts.items()) or "nothing fused") + \
            f"; nodes {nodes_before} -> {len(model.graph.node)}" + \
            (f"; left unfused: {'; '.join(self.unfused)}" if self.unfused else "")
        self.ops_after = dict(ops_after)
        return PassResult(model, modified, summary)

    # ---------------------------------------------------------------- casts
    @staticmethod
    def _drop_noop_casts(model: onnx.ModelProto, g: _Graph) -> int:
        """Cast-to-float of a float tensor is the identity: readers read its input instead."""
        casts = [n for n in model.graph.node if n.op_type == "Cast" and _attr(n, "to") == TensorProto.FLOAT]
        if not casts:
            return 0
        floats = _float_tensors(model)
        graph_outputs = {o.name for o in model.graph.output}
        removed = 0
        for n in casts:
            if n.input[0] in floats and n.output[0] not in graph_outputs:
                _rename_input(g, n.output[0], n.input[0])
                g.consumers[n.input[0]].extend(g.consumers.pop(n.output[0], []))
                model.graph.node.remove(n)
                removed += 1
        return removed

    # ---------------------------------------------------------------- norms
    def _match_rms(self, g: _Graph, mul_out: onnx.NodeProto) -> tuple[str, str, float, list[onnx.NodeProto]]:
        """``Mul(gamma, Mul(x, Div(1, Sqrt(Add(ReduceMean(Pow(x, 2)), eps)))))`` -> (x, gamma, eps, nodes)."""
        for gi, ni in ((0, 1), (1, 0)):
            gamma = mul_out.input[gi]
            if g.init_name(gamma) is None:
                continue
            try:
                norm = g.op(mul_out.input[ni], "Mul")
                for xi, ri in ((0, 1), (1, 0)):
                    x = norm.input[xi]
                    recip = g.producer.get(norm.input[ri])
                    if recip is None:
                        continue
                    if recip.op_type == "Div" and g.const(recip.input[0]) is not None and \
                            g.scalar(recip.input[0]) == 1.0:
                        sqrt = g.op(recip.input[1], "Sqrt")
                    elif recip.op_type == "Reciprocal":
                        sqrt = g.op(recip.input[0], "Sqrt")
                    else:
                        continue
                    add = g.op(sqrt.input[0], "Add")
                    mean_i = 0 if g.const(add.input[1]) is not None else 1
                    eps = g.scalar(add.input[1 - mean_i])
                    mean = g.op(add.input[mean_i], "ReduceMean")
                    axes = g.const(mean.input[1]) if len(mean.input) > 1 else _attr(mean, "axes")
                    if axes is None or list(np.atleast_1d(axes)) != [-1] or _attr(mean, "keepdims", 1) != 1:
                        continue
                    pw = g.op(mean.input[0], "Pow", "Mul")
                    if pw.op_type == "Pow":
                        if pw.input[0] != x or g.scalar(pw.input[1]) != 2.0:
                            continue
                    elif list(pw.input) != [x, x]:
                        continue
                    return x, gamma, eps, [mul_out, norm, recip, sqrt, add, mean, pw]
            except _NoMatch:
                continue
        raise _NoMatch(f"{mul_out.name or mul_out.output[0]} is not an RMSNorm")

    def _fuse_norms(self, g: _Graph) -> dict[str, int]:
        counts = collections.Counter()
        graph = g.graph
        new_nodes: dict[int, list[onnx.NodeProto]] = {}
        drop: set[int] = set()
        graph_outputs = {o.name for o in graph.output}
        for idx, node in enumerate(list(graph.node)):
            if node.op_type != "Mul" or id(node) in drop:
                continue
            try:
                x, gamma, eps, matched = self._match_rms(g, node)
            except _NoMatch:
                continue
            out = node.output[0]
            internal = {o for n in matched[1:] for o in n.output}
            # The normalisation's intermediates must not be read outside it (or the rewrite would change them).
            if any(c not in matched for t in internal for c in g.consumers.get(t, [])) or internal & graph_outputs:
                self.unfused.append(f"RMSNorm at {out}: intermediates read elsewhere")
                continue
            base = (node.name or out).rsplit("/", 1)[0]
            add = g.producer.get(x)
            if add is not None and add.op_type == "Add" and id(add) not in drop and \
                    all(g.const(i) is None for i in add.input) and self._same_shape_add(g, add):
                fused = helper.make_node(
                    "SkipSimplifiedLayerNormalization", [add.input[0], add.input[1], gamma], [out, "", "", x],
                    name=f"{base}/SkipSimplifiedLayerNormalization", domain=MS_DOMAIN, epsilon=eps)
                drop.add(id(add))
                counts["SkipSimplifiedLayerNormalization"] += 1
            else:
                fused = helper.make_node(
                    "SimplifiedLayerNormalization", [x, gamma], [out], name=f"{base}/SimplifiedLayerNormalization",
                    axis=-1, epsilon=eps, stash_type=1)
                counts["SimplifiedLayerNormalization"] += 1
            drop.update(id(n) for n in matched)
            new_nodes[idx] = [fused]
        _splice(graph, new_nodes, drop)
        return counts

    @staticmethod
    def _untie_lm_head(g: _Graph) -> int:
        """``MatMul(h, Transpose(embed))`` (optimum's tied head) -> MatMul on its own transposed initializer.

        ONNX Runtime folds that Transpose at load anyway (the same extra FP32 copy in memory); stored as an
        initializer, a weight-only quantizer can quantize the head (MatMulNBits needs a constant B) while the
        embedding Gather keeps the original table.
        """
        done = 0
        for node in g.graph.node:
            if node.op_type != "MatMul":
                continue
            tr = g.producer.get(node.input[1])
            if tr is None or tr.op_type != "Transpose" or g.init_name(tr.input[0]) is None:
                continue
            w = numpy_helper.to_array(g.inits[g.init_name(tr.input[0])])
            perm = _attr(tr, "perm") or list(range(w.ndim))[::-1]
            name = "lm_head.weight" if "logits" in node.output else f"{tr.input[0]}_transposed_const"
            if name in g.inits:
                continue
            g.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.transpose(perm)), name))
            g.inits[name] = g.graph.initializer[-1]
            node.input[1] = name
            done += 1
        return done

    @staticmethod
    def _same_shape_add(g: _Graph, add: onnx.NodeProto) -> bool:
        """Both residual-Add inputs are hidden states (no broadcast): neither comes from a constant or a shape op."""
        return all(i not in g.inits and (g.producer.get(i) is None or g.producer[i].op_type not in
                                          ("Constant", "Shape", "ConstantOfShape", "Expand")) for i in add.input)

    # ---------------------------------------------------------------- attention
    def _fuse_attention(self, model: onnx.ModelProto, g: _Graph) -> dict[str, int]:
        counts = collections.Counter()
        self._mask_cache = None
        graph = model.graph
        inputs = {i.name for i in graph.input}
        outputs = {o.name for o in graph.output}
        if "attention_mask" not in inputs:
            self.unfused.append("attention: the model has no attention_mask input")
            return counts
        matches = []
        for node in list(graph.node):
            if node.op_type != "Softmax":
                continue
            try:
                matches.append(self._match_attention(g, node, inputs, outputs))
            except _NoMatch as exc:
                self.unfused.append(f"attention at {node.name or node.output[0]}: {exc}")
        if not matches:
            return counts
        # Rotary caches: evaluate the model's own cos/sin subgraph over positions 0..max_positions-1.
        try:
            caches = self._rotary_caches(model, g, matches)
        except _NoMatch as exc:
            self.unfused.append(f"attention: {exc}")
            return counts

        new_nodes: dict[int, list[onnx.NodeProto]] = {}
        drop: set[int] = set()
        index = {id(n): k for k, n in enumerate(graph.node)}
        seqlens, total = "edgeq/gqa/seqlens_k", "edgeq/gqa/total_sequence_length"
        prelude = _seqlens_nodes(seqlens, total)
        new_nodes.setdefault(0, []).extend(prelude)
        added_inits: list[onnx.TensorProto] = []
        used_prefixes: set[str] = set()
        for k, m in enumerate(matches):
            rotary = m["cos"] is not None
            cos_name, sin_name = (caches[m["cos"]], caches[m["sin"]]) if rotary else ("", "")
            base = m["prefix"] if m["prefix"] not in used_prefixes else f"{m['prefix']}/attention{k}"
            used_prefixes.add(base)
            q_w, k_w, v_w = (numpy_helper.to_array(g.inits[m[w]]) for w in ("wq", "wk", "wv"))
            d = m["head_dim"]
            heads, kv_heads = q_w.shape[1] // d, k_w.shape[1] // d
            if q_w.shape[1] % d or k_w.shape[1] % d or k_w.shape != v_w.shape or heads % kv_heads:
                self.unfused.append(f"attention {base}: projection shapes {q_w.shape} {k_w.shape} {v_w.shape}")
                continue
            emitted = []
            if self.pack_qkv:
                w_name = f"{base}/qkv_proj.weight"
                added_inits.append(numpy_helper.from_array(
                    np.concatenate([q_w, k_w, v_w], axis=1).astype(q_w.dtype), w_name))
                qkv = f"{base}/qkv_proj/MatMul_output_0"
                emitted.append(helper.make_node("MatMul", [m["x"], w_name], [qkv], name=f"{base}/qkv_proj/MatMul"))
                if any(m["biases"]):  # GroupQueryAttention takes no bias: one Add of the packed [bq | bk | bv]
                    b_name = f"{base}/qkv_proj.bias"
                    parts = [numpy_helper.to_array(g.inits[b[1]]) if b else np.zeros(w.shape[1], q_w.dtype)
                             for b, w in zip(m["biases"], (q_w, k_w, v_w))]
                    added_inits.append(numpy_helper.from_array(np.concatenate(parts).astype(q_w.dtype), b_name))
                    emitted.append(helper.make_node("Add", [qkv, b_name], [qkv + "_bias"],
                                                    name=f"{base}/qkv_proj/Add"))
                    qkv = qkv + "_bias"
                    drop.update(id(b[0]) for b in m["biases"] if b)
                qkv_inputs = [qkv, "", ""]
                drop.update(id(n) for n in (m["q_mm"], m["k_mm"], m["v_mm"]))
                counts["packed QKV MatMul"] += 1
            else:
                qkv_inputs = [m["q"], m["k"], m["v"]]
            emitted.append(helper.make_node(
                "GroupQueryAttention",
                qkv_inputs + [m["past_key"], m["past_value"], seqlens, total, cos_name, sin_name],
                [m["out"], m["present_key"], m["present_value"]], name=f"{base}/GroupQueryAttention",
                domain=MS_DOMAIN, num_heads=heads, kv_num_heads=kv_heads, scale=m["scale"], do_rotary=int(rotary),
                rotary_interleaved=0))
            drop.update(id(n) for n in m["replaced"])
            new_nodes.setdefault(index[id(m["out_node"])], []).extend(emitted)
            counts["GroupQueryAttention"] += 1
        dangling = _dangling(graph, new_nodes, drop)
        if dangling:
            self.unfused.append(f"attention: rewrite would leave {sorted(dangling)[:3]} read after removal")
            return collections.Counter()
        graph.initializer.extend(added_inits)
        _splice(graph, new_nodes, drop)
        return counts

    def _rope(self, g: _Graph, name: str) -> tuple[str, str, str, list[onnx.NodeProto]]:
        """``Add(Mul(x, cos), Mul(Concat(Neg(Slice(x, h:)), Slice(x, :h)), sin))`` -> (x, cos, sin, nodes)."""
        add = g.op(name, "Add")
        for a, b in ((0, 1), (1, 0)):
            try:
                m1, m2 = g.op(add.input[a], "Mul"), g.op(add.input[b], "Mul")
                for ci in (0, 1):
                    cat = g.producer.get(m2.input[ci])
                    if cat is None or cat.op_type != "Concat" or len(cat.input) != 2:
                        continue
                    sin = m2.input[1 - ci]
                    neg = g.op(cat.input[0], "Neg")
                    s_hi, s_lo = g.op(neg.input[0], "Slice"), g.op(cat.input[1], "Slice")
                    x = s_lo.input[0]
                    if s_hi.input[0] != x or x not in m1.input:
                        continue
                    cos = m1.input[1 - list(m1.input).index(x)]
                    return x, cos, sin, [add, m1, m2, cat, neg, s_hi, s_lo]
            except _NoMatch:
                continue
        raise _NoMatch(f"{name!r} is not a rotate_half rotary embedding")

    @staticmethod
    def _proj(g: _Graph, name: str) -> tuple[str, str, onnx.NodeProto, list[onnx.NodeProto], int | None,
                                             tuple[onnx.NodeProto, str] | None]:
        """``Transpose(Reshape(MatMul(x, W) [+ b]), [0,2,1,3])`` -> (x, W, matmul, nodes, head_dim, (Add, b) or None).

        The bias (Qwen2's q/k/v projections) is a 1-D initializer of W's output width added after the MatMul."""
        tr = g.op(name, "Transpose")
        if list(_attr(tr, "perm", [])) != [0, 2, 1, 3]:
            raise _NoMatch(f"{name!r}: transpose is not BSHD->BHSD")
        rs = g.op(tr.input[0], "Reshape")
        bias = None
        node = g.producer.get(rs.input[0])
        if node is not None and node.op_type == "Add":
            for bi in (0, 1):
                b = g.init_name(node.input[bi])
                src = g.producer.get(node.input[1 - bi])
                if b is not None and len(g.inits[b].dims) == 1 and src is not None and src.op_type == "MatMul":
                    bias, mm_input = (node, b), node.input[1 - bi]
                    break
            else:
                raise _NoMatch(f"{name!r}: the Add before the head reshape is not a projection bias")
        mm = g.op(mm_input if bias else rs.input[0], "MatMul")
        w = g.init_name(mm.input[1])
        if w is None or len(g.inits[w].dims) != 2:
            raise _NoMatch(f"{name!r}: projection weight is not a 2-D initializer")
        if bias and list(g.inits[bias[1]].dims) != [g.inits[w].dims[1]]:
            raise _NoMatch(f"{name!r}: bias shape {list(g.inits[bias[1]].dims)} does not fit the weight")
        head_dim = None
        shape = g.const(rs.input[1])
        if shape is not None and shape.size == 4 and shape[-1] > 0:
            head_dim = int(shape[-1])
        else:
            cat = g.producer.get(rs.input[1])
            if cat is not None and cat.op_type == "Concat" and len(cat.input) == 4:
                last = g.const(cat.input[3])
                if last is not None and last.size == 1 and int(last.reshape(())) > 0:
                    head_dim = int(last.reshape(()))
        return mm.input[0], w, mm, [tr, rs, mm], head_dim, bias

    @staticmethod
    def _repeat_kv(g: _Graph, name: str) -> tuple[str, list[onnx.NodeProto]]:
        """``Reshape(Expand(Unsqueeze(kv, 2)))`` (GQA head repeat) or the cache itself -> (cache, nodes)."""
        node = g.producer.get(name)
        if node is not None and node.op_type == "Reshape":
            ex = g.op(node.input[0], "Expand")
            un = g.op(ex.input[0], "Unsqueeze")
            return un.input[0], [node, ex, un]
        return name, []

    def _mask_dependents(self, g: _Graph) -> set[str]:
        if getattr(self, "_mask_cache", None) is None or self._mask_cache[0] is not g:
            self._mask_cache = (g, _descendants(g, "attention_mask"))
        return self._mask_cache[1]

    def _match_attention(self, g: _Graph, softmax: onnx.NodeProto, inputs: set[str], outputs: set[str]) -> dict:
        if _attr(softmax, "axis", -1) not in (-1, 3):
            raise _NoMatch("softmax is not over the last axis")
        replaced = [softmax]
        scores_add = g.op(softmax.input[0], "Add")
        replaced.append(scores_add)
        mm_qk = None
        for si in (0, 1):
            cand = g.producer.get(scores_add.input[si])
            scaled = None
            if cand is not None and cand.op_type in ("Div", "Mul") and g.const(cand.input[1]) is not None:
                scaled, cand = cand, g.producer.get(cand.input[0])
            if cand is not None and cand.op_type == "MatMul":
                mm_qk = cand
                if scaled is not None:
                    replaced.append(scaled)
                if scores_add.input[1 - si] not in self._mask_dependents(g):
                    raise _NoMatch("the additive mask does not come from attention_mask")
                break
        if mm_qk is None:
            raise _NoMatch("no Q.K^T MatMul before the softmax")
        replaced.append(mm_qk)
        scale = 1.0
        for n in replaced:
            if n.op_type in ("Div", "Mul") and n is not softmax and n is not scores_add:
                c = g.scalar(n.input[1])
                scale = scale / c if n.op_type == "Div" else scale * c

        def strip_scale(name: str) -> str:
            nonlocal scale
            node = g.producer.get(name)
            while node is not None and node.op_type in ("Mul", "Div") and g.const(node.input[1]) is not None:
                c = g.scalar(node.input[1])
                scale = scale / c if node.op_type == "Div" else scale * c
                replaced.append(node)
                name = node.input[0]
                node = g.producer.get(name)
            return name

        q_rot = strip_scale(mm_qk.input[0])
        k_t = strip_scale(mm_qk.input[1])
        tr_k = g.op(k_t, "Transpose")
        if list(_attr(tr_k, "perm", [])) != [0, 1, 3, 2]:
            raise _NoMatch("K is not transposed to BHDS")
        replaced.append(tr_k)
        k_rep = strip_scale(tr_k.input[0])
        present_key, rep_nodes = self._repeat_kv(g, k_rep)
        replaced += rep_nodes

        probs = softmax.output[0]
        readers = g.consumers.get(probs, [])
        if len(readers) == 2 and {r.op_type for r in readers} == {"IsNaN", "Where"}:  # NaN guard of all-masked rows
            where = next(r for r in readers if r.op_type == "Where")
            replaced += readers
            probs = where.output[0]
            readers = g.consumers.get(probs, [])
        if len(readers) != 1 or readers[0].op_type != "MatMul" or readers[0].input[0] != probs:
            raise _NoMatch("softmax output does not feed one P.V MatMul")
        mm_pv = readers[0]
        replaced.append(mm_pv)
        present_value, rep_nodes = self._repeat_kv(g, mm_pv.input[1])
        replaced += rep_nodes
        out_tr = g.consumers.get(mm_pv.output[0], [])
        if len(out_tr) != 1 or out_tr[0].op_type != "Transpose" or list(_attr(out_tr[0], "perm", [])) != [0, 2, 1, 3]:
            raise _NoMatch("attention output is not transposed back to BSHD")
        out_rs = g.consumers.get(out_tr[0].output[0], [])
        if len(out_rs) != 1 or out_rs[0].op_type != "Reshape":
            raise _NoMatch("attention output is not reshaped to BSD")
        replaced += [out_tr[0], out_rs[0]]

        # KV cache: present = Concat(past, new) on the sequence axis; both are graph outputs.
        caches = {}
        for kind, present in (("key", present_key), ("value", present_value)):
            cat = g.op(present, "Concat")
            if _attr(cat, "axis") not in (-2, 2) or len(cat.input) != 2 or cat.input[0] not in inputs:
                raise _NoMatch(f"present {kind} is not Concat(past, new, axis=-2)")
            if present not in outputs:
                raise _NoMatch(f"{present!r} is not a graph output")
            caches[kind] = (cat.input[0], cat.input[1])
            replaced.append(cat)

        try:
            q_t, cos, sin, rope_q = self._rope(g, q_rot)
            k_new, cos_k, sin_k, rope_k = self._rope(g, caches["key"][1])
        except _NoMatch as exc:
            # A layer without rotary (SmolLM3's NoPE layers): q and k come straight from their projections, checked
            # by _proj below; any other rotary spelling fails there and leaves the layer unfused.
            if any(g.producer.get(t) is None or g.producer[t].op_type != "Transpose"
                   for t in (q_rot, caches["key"][1])):
                raise exc
            q_t, k_new, cos, sin, cos_k, sin_k, rope_q, rope_k = q_rot, caches["key"][1], None, None, None, None, [], []
        if (cos, sin) != (cos_k, sin_k):
            raise _NoMatch("q and k use different rotary tables")
        xq, wq, q_mm, q_nodes, dq, bq = self._proj(g, q_t)
        xk, wk, k_mm, k_nodes, dk, bk = self._proj(g, k_new)
        xv, wv, v_mm, v_nodes, dv, bv = self._proj(g, caches["value"][1])
        biases = (bq, bk, bv)
        if not xq == xk == xv:
            raise _NoMatch("q, k, v projections read different inputs")
        head_dim = dq or dk or dv
        if head_dim is None:
            raise _NoMatch("head size unknown")
        # The projection MatMuls go only when packed (_fuse_attention drops them); unpacked, GQA reads them.
        replaced += rope_q + rope_k + q_nodes[:-1] + k_nodes[:-1] + v_nodes[:-1]
        # Nothing outside the block may read its intermediates (the rotary q/k, the repeated cache...).
        internal = {o for n in replaced for o in n.output} - {out_rs[0].output[0], present_key, present_value}
        ids = {id(n) for n in replaced} | {id(q_mm), id(k_mm), id(v_mm)} | {id(b[0]) for b in biases if b}
        # Shape readers are allowed: they feed the block's own shape arithmetic, which dies with it (checked
        # globally before the rewrite is applied, see _dangling).
        for t in internal:
            for c in g.consumers.get(t, []):
                if id(c) not in ids and c.op_type != "Shape":
                    raise _NoMatch(f"{t!r} is read outside the attention block by {c.op_type}")
        if not (np.isfinite(scale) and scale > 0):
            raise _NoMatch(f"attention scale {scale}")
        prefix = out_rs[0].output[0].rsplit("/", 2)[0] if "/" in out_rs[0].output[0] else f"attn{len(replaced)}"
        return dict(softmax=softmax, replaced=replaced, out=out_rs[0].output[0], out_node=out_rs[0],
                    present_key=present_key, present_value=present_value, past_key=caches["key"][0],
                    past_value=caches["value"][0], x=xq, wq=wq, wk=wk, wv=wv, q_mm=q_mm, k_mm=k_mm, v_mm=v_mm,
                    q=(bq[0] if bq else q_mm).output[0], k=(bk[0] if bk else k_mm).output[0],
                    v=(bv[0] if bv else v_mm).output[0], biases=biases, cos=cos, sin=sin,
                    head_dim=head_dim, scale=float(scale), prefix=prefix)

    def _rotary_caches(self, model: onnx.ModelProto, g: _Graph, matches: list[dict]) -> dict[str, str]:
        """Evaluate each distinct cos/sin table for positions 0..max_positions-1; return tensor -> initializer."""
        import onnxruntime as ort

        wanted = sorted(({m["cos"] for m in matches} | {m["sin"] for m in matches}) - {None})
        if not wanted:
            return {}
        nodes, needed_inputs = _ancestors(g, wanted)
        graph_inputs = {i.name: i for i in model.graph.input}
        # Gemma's export ignores position_ids and counts positions from the cache instead (cache_position =
        # arange(past_len, past_len + seq), read off Shape(past) and Shape(embeddings)): such tables are evaluated
        # for an empty past and max_positions new tokens. Allowed only where those inputs reach the tables through
        # Shape alone (their values never matter, so placeholder values give the true tables).
        other = set(needed_inputs) - {"position_ids"}
        if other - {"input_ids"} - {n for n in other if _PAST_RE.fullmatch(n)}:
            raise _NoMatch(f"rotary tables depend on {sorted(needed_inputs)}, not only on positions")
        tainted = set(other)
        for n in nodes:
            if n.op_type not in ("Shape", "Size") and any(i in tainted for i in n.input):
                tainted.update(o for o in n.output if o)
        if tainted & set(wanted):
            raise _NoMatch(f"rotary tables depend on the values of {sorted(other)}, not only their shapes")
        if not needed_inputs:
            raise _NoMatch("rotary tables do not depend on the positions")
        used = {i for n in nodes for i in n.input}
        sub = helper.make_graph(
            nodes, "rotary", [graph_inputs[n] for n in needed_inputs],
            [onnx.ValueInfoProto(name=w) for w in wanted],
            [t for t in model.graph.initializer if t.name in used])
        sub_model = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(sub_model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        feeds = {}
        for i in sess.get_inputs():
            if i.name in ("position_ids", "input_ids"):
                feeds[i.name] = np.arange(self.max_positions, dtype=np.int64)[None, :] * (i.name == "position_ids")
            else:  # past [batch, kv_heads, 0, head_dim], read only through its shape
                dims = [d if isinstance(d, int) else 1 for d in i.shape]
                feeds[i.name] = np.zeros(dims[:2] + [0] + dims[3:], np.float32)
        values = dict(zip(wanted, sess.run(wanted, feeds)))
        names = {}
        for k, w in enumerate(wanted):
            table = np.asarray(values[w])
            table = table.reshape(-1, table.shape[-1])  # [max_positions, head_dim]
            if table.shape[0] != self.max_positions:
                raise _NoMatch(f"rotary table {w!r} has shape {values[w].shape}")
            half = table.shape[1] // 2
            if not np.allclose(table[:, :half], table[:, half:], rtol=0, atol=1e-6):
                raise _NoMatch("rotary table halves differ (interleaved or partial rotary)")
            kind = "cos" if any(m["cos"] == w for m in matches) else "sin"
            name = f"edgeq/gqa/{kind}_cache" + (f"_{k}" if len(wanted) > 2 else "")
            model.graph.initializer.append(numpy_helper.from_array(
                np.ascontiguousarray(table[:, :half]).astype(np.float32), name))
            names[w] = name
        return names


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


def _descendants(g: _Graph, name: str) -> set[str]:
    """Every tensor computed from tensor ``name``."""
    seen, stack = set(), [name]
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        for n in g.consumers.get(t, []):
            stack.extend(o for o in n.output if o)
    return seen


def _ancestors(g: _Graph, names: list[str]) -> tuple[list[onnx.NodeProto], list[str]]:
    """Nodes computing ``names`` (in graph order) and the graph inputs they read."""
    seen_nodes: set[int] = set()
    graph_inputs = {i.name for i in g.graph.input}
    needed, stack = set(), list(names)
    visited = set()
    while stack:
        t = stack.pop()
        if t in visited:
            continue
        visited.add(t)
        node = g.producer.get(t)
        if node is None:
            if t in graph_inputs and t not in g.inits:
                needed.add(t)
            continue
        if id(node) not in seen_nodes:
            seen_nodes.add(id(node))
            stack.extend(i for i in node.input if i)
    return [n for n in g.graph.node if id(n) in seen_nodes], sorted(needed)


def _splice(graph: onnx.GraphProto, new_nodes: dict[int, list[onnx.NodeProto]], drop: set[int]) -> None:
    """Rebuild the node list: new nodes go in before position ``k``; dropped nodes go away."""
    out = []
    for k, n in enumerate(graph.node):
        out.extend(new_nodes.get(k, []))
        if id(n) not in drop:
            out.append(n)
    del graph.node[:]
    graph.node.extend(out)


def _dangling(graph: onnx.GraphProto, new_nodes: dict[int, list[onnx.NodeProto]], drop: set[int]) -> set[str]:
    """Tensors that a node still live after the rewrite would read but that no node produces any more."""
    kept = [n for n in graph.node if id(n) not in drop] + [n for ns in new_nodes.values() for n in ns]
    produced = {o for n in kept for o in n.output if o}
    removed = {o for n in graph.node if id(n) in drop for o in n.output if o} - produced
    producer = {o: n for n in kept for o in n.output if o}
    live, stack, bad = set(), [o.name for o in graph.output], set()
    while stack:
        t = stack.pop()
        if t in live:
            continue
        live.add(t)
        if t in removed:
            bad.add(t)
        node = producer.get(t)
        if node is not None:
            stack.extend(i for i in node.input if i)
    return bad


def _dead_code_elimination(model: onnx.ModelProto) -> None:
    g = model.graph
    live = {o.name for o in g.output}
    keep = []
    for n in reversed(g.node):
        if any(o in live for o in n.output if o):
            keep.append(n)
            live.update(i for i in n.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [t for t in g.initializer if t.name in live]
    del g.initializer[:]
    g.initializer.extend(inits)
    inputs = [i for i in g.input if i.name in live]
    del g.input[:]
    g.input.extend(inputs)
    vis = [v for v in g.value_info if v.name in live]
    del g.value_info[:]
    g.value_info.extend(vis)


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Stable Kahn sort (keeps the given order where it is already valid)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    producers = {o: k for k, n in enumerate(graph.node) for o in n.output if o}
    nodes = list(graph.node)
    waiting = collections.defaultdict(list)
    missing = []
    ready = []
    for k, n in enumerate(nodes):
        deps = {i for i in n.input if i not in available and i in producers}
        missing.append(len(deps))
        for d in deps:
            waiting[d].append(k)
        if not deps:
            ready.append(k)
    import heapq
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(nodes[k])
        for o in nodes[k].output:
            for j in waiting.pop(o, []):
                missing[j] -= 1
                if missing[j] == 0:
                    heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise RuntimeError("graph has a cycle after fusion")
    del graph.node[:]
    graph.node.extend(order)


def _ensure_opset(model: onnx.ModelProto, domain: str, version: int) -> None:
    if not any(o.domain == domain for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(domain, version))
