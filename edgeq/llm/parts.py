"""A decoder package run a few layers at a time, for the measurements an export makes on the host.

An ONNX Runtime session holds every weight of the package, prepacked (x86, accuracy_level 4: 1.14x the stored INT4
bytes, plus the FP32 scales it leaves mapped): 7.0 GB for an 8B-shaped package of 6.3 GB, 7.7 GB after a window,
which put the 8B export's evaluate stage at 8.4 GB. Split at layer boundaries into parts of at most ``PART_BYTES``
of stored weights, run part after part (each over every window before the next opens), the package's own nodes
and initializers (read from its external data where they are, nothing copied) give the whole graph's logits (test:
equal) with one part's weights in memory. A package that fits one part is run whole, as before.

What flows between parts is each chunk's tensors that later parts read (the residual stream, the attention mask's
lengths): a 4096-wide model keeps ~2 MB per 64-token chunk. Constants are repeated in every part that reads them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from edgeq.progress import QUIET, Progress
from edgeq.runtime import session

WHOLE_BYTES = 2 << 30  # stored weights up to which a package runs whole: SmolLM2, the 1B shape (1.2 GB)
PART_BYTES = 1 << 30  # per part above that: an 8B package in 6 parts (3 parts of 2 GiB peaked at 3.5 GB, 6 at 1.9)
_LAYER = re.compile(r"^/model\.layers\.(\d+)[./]")
_PAST, _PRESENT = "past_key_values", "present"
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                "tensor(int32)": np.int32}


@dataclass(frozen=True)
class Part:
    nodes: tuple[int, ...]  # indices into the graph's nodes, in graph order
    layers: tuple[int, int]  # first and last decoder layer in it
    inputs: tuple[str, ...]  # graph inputs and earlier parts' tensors it reads
    outputs: tuple[str, ...]  # graph outputs and tensors later parts read


class PartedModel:
    """A package's graph cut into ``parts`` (one: run it whole). Sessions are opened one part at a time."""

    def __init__(self, model_path: Path, max_bytes: int | None = None, whole_bytes: int | None = None) -> None:
        self.path = Path(model_path)
        self.graph = onnx.load(str(self.path), load_external_data=False)
        self.parts = _cut(self.graph, PART_BYTES if max_bytes is None else max_bytes,
                          WHOLE_BYTES if whole_bytes is None else whole_bytes)
        self.graph_inputs = {i.name: i for i in self.graph.graph.input}
        self._types: dict[str, tuple[int, int]] = {}  # cut tensor -> (ONNX element type, rank), as first produced

    def __len__(self) -> int:
        return len(self.parts)

    def session(self, k: int) -> ort.InferenceSession:
        """Part ``k``'s session: its nodes, the initializers they read (external data in the package's folder)."""
        g, part = self.graph.graph, self.parts[k]
        nodes = [g.node[i] for i in part.nodes]
        used = {x for n in nodes for x in n.input}
        inputs = [self.graph_inputs[x] if x in self.graph_inputs else
                  onnx.helper.make_tensor_value_info(x, self._types[x][0], [None] * self._types[x][1])
                  for x in part.inputs]
        outputs = [next((o for o in g.output if o.name == x), None) or onnx.ValueInfoProto(name=x) for x in part.outputs]
        sub = onnx.ModelProto()
        _copy_header(self.graph, sub)
        sub.graph.node.extend(nodes)
        sub.graph.input.extend(inputs)
        sub.graph.output.extend(outputs)
        sub.graph.initializer.extend(t for t in g.initializer if t.name in used)
        return session(sub, arena=False, data_dir=self.path.parent)

    def note_types(self, values: dict[str, np.ndarray]) -> None:
        for name, v in values.items():
            self._types.setdefault(name, (onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.ndim))


def _copy_header(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    """Everything of ``src`` but its graph's contents (a full CopyFrom would copy every initializer proto per part)."""
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(dst, field, getattr(src, field))
    dst.opset_import.extend(src.opset_import)
    dst.functions.extend(src.functions)
    dst.graph.name = src.graph.name


def _tensor_bytes(t: onnx.TensorProto) -> int:
    for e in t.external_data:
        if e.key == "length":
            return int(e.value)
    return len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes


def _cut(model: onnx.ModelProto, max_bytes: int, whole_bytes: int) -> tuple[Part, ...]:
    """Whole layers per part, in order, each part's new weights at most ``max_bytes`` (a single larger layer is a
    part of its own). Nodes before the first layer go with it, nodes after a layer (the final norm, the head) with
    that layer. A graph of at most ``whole_bytes`` of weights, or whose nodes name no layer, is one part."""
    g = model.graph
    sizes = {t.name: _tensor_bytes(t) for t in g.initializer}
    layer_of, current = [], -1
    for n in g.node:
        m = _LAYER.match(n.name)
        current = int(m.group(1)) if m else current
        layer_of.append(current)
    layers = sorted(set(layer_of) - {-1})
    whole = (Part(tuple(range(len(g.node))), (layers[0], layers[-1]) if layers else (0, 0),
                  tuple(i.name for i in g.input), tuple(o.name for o in g.output)),)
    if not layers:
        return whole
    layer_of = [max(layer, layers[0]) for layer in layer_of]  # what comes before the first layer goes with it
    seen: set[str] = set()
    weight = dict.fromkeys(layers, 0)
    for n, layer in zip(g.node, layer_of):
        for x in n.input:
            if x in sizes and x not in seen:
                seen.add(x)
                weight[layer] += sizes[x]
    if sum(weight.values()) <= whole_bytes:
        return whole
    groups: list[list[int]] = []
    for layer in layers:
        if groups and sum(weight[i] for i in groups[-1]) + weight[layer] <= max_bytes:
            groups[-1].append(layer)
        else:
            groups.append([layer])
    if len(groups) == 1:
        return whole
    part_of_layer = {layer: k for k, grp in enumerate(groups) for layer in grp}
    node_part = [part_of_layer[layer] for layer in layer_of]
    constants = {o: i for i, n in enumerate(g.node) if n.op_type == "Constant" and not n.input for o in n.output}
    members: list[list[int]] = [[] for _ in groups]
    for i, (n, k) in enumerate(zip(g.node, node_part)):
        if n.op_type == "Constant" and not n.input:
            continue  # repeated in each part that reads it, below
        members[k].append(i)
    for k, nodes in enumerate(members):
        needed = sorted({constants[x] for i in nodes for x in g.node[i].input if x in constants})
        members[k] = sorted(set(nodes) | set(needed))
    produced_in = {o: k for k, nodes in enumerate(members) for i in nodes for o in g.node[i].output if o}
    graph_outputs = {o.name for o in g.output}
    parts = []
    for k, nodes in enumerate(members):
        made = {o for i in nodes for o in g.node[i].output if o}
        reads = [x for i in nodes for x in g.node[i].input if x and x not in made and x not in sizes]
        later = {x for j in range(k + 1, len(members)) for i in members[j] for x in g.node[i].input}
        outs = [o for i in nodes for o in g.node[i].output if o and (o in graph_outputs or
                                                                     (o in later and o not in constants))]
        if any(produced_in.get(x, -1) > k for x in reads):
            raise ValueError("a node reads a tensor made in a later layer: the graph cannot be cut by layers")
        parts.append(Part(tuple(nodes), (groups[k][0], groups[k][-1]), tuple(dict.fromkeys(reads)),
                          tuple(dict.fromkeys(outs))))
    return tuple(parts)


def input_feeds(inputs: Sequence[ort.NodeArg], ids: np.ndarray, start: int = 0) -> dict[str, np.ndarray]:
    """Feeds of a decoder's graph ``inputs`` for ``ids`` [S] at positions ``start``.. of a window. At 0 the KV cache
    is empty: past tensors get 0 for their symbolic sequence dimension; past ``start`` they are left out, for the
    caller's cache of those positions (``edgeq.llm.evaluate.window_feeds`` over a whole session's inputs)."""
    seq = ids.shape[-1]
    feeds = {}
    for inp in inputs:
        dtype = _NUMPY_TYPES.get(inp.type)
        if inp.name == "input_ids":
            feeds[inp.name] = ids.reshape(1, seq).astype(dtype)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((1, start + seq), dtype)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(start, start + seq, dtype=dtype).reshape(1, seq)
        elif inp.name.startswith(_PAST) and start:
            continue
        elif inp.name.startswith(_PAST):
            # [batch, kv_heads, past_seq, head_dim]: the first symbolic dim is the batch (1), any other is past (0)
            shape = [d if isinstance(d, int) else (1 if i == 0 else 0) for i, d in enumerate(inp.shape)]
            feeds[inp.name] = np.zeros(shape, dtype)
        else:
            raise ValueError(f"model input '{inp.name}' is not one a causal LM export has")
    return feeds


def _run_part(model: PartedModel, sess: ort.InferenceSession, k: int, ids: np.ndarray, start: int,
              carried: dict[str, np.ndarray], cache: dict[str, ort.OrtValue]) -> dict[str, np.ndarray]:
    """One chunk through part ``k``: reads the graph inputs and what earlier parts ``carried``; the KV cache of its
    layers is updated in ``cache``; returns its other outputs (the logits, tensors for later parts)."""
    part = model.parts[k]
    graph = [i for i in sess.get_inputs() if i.name in model.graph_inputs]
    feeds = {x: ort.OrtValue.ortvalue_from_numpy(v) for x, v in input_feeds(graph, ids, start).items()} | cache
    feeds |= {x: ort.OrtValue.ortvalue_from_numpy(carried[x]) for x in part.inputs if x not in model.graph_inputs}
    values = dict(zip(part.outputs, sess.run_with_ort_values(list(part.outputs), feeds)))
    out = {}
    for name, v in values.items():
        if name.startswith(_PRESENT):
            cache[name.replace(_PRESENT, _PAST, 1)] = v
        else:
            out[name] = v.numpy()
    model.note_types(out)
    return out


def parted_logits(model: PartedModel, windows: np.ndarray, run_tokens: int,
                  progress: Progress = QUIET) -> Iterator[tuple[int, int, np.ndarray]]:
    """(window, first position, logits [n, V]) of every window, ``run_tokens`` positions per run with the KV cache
    fed back, as ``edgeq.llm.evaluate.logit_chunks`` gives them from one session: part 1 over every window, then
    part 2 over what part 1 left, ... the last part's logits yielded as they come."""
    has_past = any(x.startswith(_PAST) for x in model.graph_inputs)
    step = run_tokens if has_past else windows.shape[1]
    carried: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    last = len(model) - 1
    for k, part in enumerate(model.parts):
        keep = {x for p in model.parts[k + 1:] for x in p.inputs}  # what later parts still read
        sess = model.session(k)
        for i, ids in enumerate(windows):
            cache: dict[str, ort.OrtValue] = {}
            for start in range(0, len(ids), step):
                here = carried.pop((i, start), {})
                out = _run_part(model, sess, k, ids[start:start + step], start, here, cache)
                if k == last:
                    yield i, start, out["logits"][0]
                else:
                    carried[(i, start)] = {x: v for x, v in (here | out).items() if x in keep}
            if k < last:
                progress.step(f"evaluation part {k + 1}/{len(model)} (layers {part.layers[0]}-{part.layers[1]}): "
                              "window", i + 1, len(windows))
        del sess


def parted_greedy(model: PartedModel, prompt_ids: Sequence[int], n: int, eos: Callable[[int], bool],
                  progress: Progress = QUIET) -> list[int]:
    """Greedy search as onnxruntime-genai runs it (the prompt in one run, then one token per run on the KV cache),
    part after part for every token: ``n`` tokens, fewer if ``eos`` comes first (included). Each token opens every
    part again: memory of one part, time of a load per token."""
    caches: list[dict[str, ort.OrtValue]] = [{} for _ in model.parts]
    out: list[int] = []
    ids, start = np.asarray(prompt_ids, np.int64), 0
    while len(out) < n:
        carried: dict[str, np.ndarray] = {}
        for k in range(len(model)):
            sess = model.session(k)
            carried |= _run_part(model, sess, k, ids, start, carried, caches[k])
            del sess
        token = int(np.argmax(carried["logits"][0, -1]))
        out.append(token)
        progress.step("greedy token", len(out), n)
        if eos(token):
            break
        start += len(ids)
        ids = np.asarray([token], np.int64)
    return out
