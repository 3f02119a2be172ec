"""Speed of a model on this machine, and the physical limit it is measured against.

* ``measure_bandwidth``: the machine's memory bandwidth, from numpy over an array far larger than any cache, on as
  many threads as the decode runs use.
* ``decode_bytes_per_token``: the weight bytes one decode step reads as stored (ONNX initializers or GGUF tensors);
  ``decode_bytes_as_run``: the same count over the graph ONNX Runtime actually runs on this CPU.
* ``encoder_ms_per_sentence``: an encoder at batch 1 on real sentences (``EncoderTimer``: the same, repeatable).
* ``llm_speed``: prefill and decode tokens/s of an onnxruntime-genai package.

Decode of a small LLM at batch 1 reads every weight once per token and does little arithmetic per byte, so
``bandwidth / bytes_per_token`` (as run) is the fastest it can go: the decode ceiling.

``threads``: every engine gets the same intra-op thread count (``default_threads``: the CPUs this process may run
on); ONNX Runtime's own default is the physical cores and llama.cpp's is whatever its caller passes, so without it
two engines on one machine can run on different numbers of cores.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

BANDWIDTH_MB = 512  # 8-32x the last-level cache of phones and small servers: every pass goes to DRAM
BANDWIDTH_REPEATS = 7


@dataclass(frozen=True)
class Bandwidth:
    """GB/s (1e9 bytes). ``read`` is what decode does (stream weights in); ``copy`` counts read + write bytes."""

    read_gbs: float
    copy_gbs: float
    method: str

    @property
    def gbs(self) -> float:
        """The figure the ceiling uses: the larger of the two, so the ceiling is never too low."""
        return max(self.read_gbs, self.copy_gbs)

    def to_dict(self) -> dict:
        return asdict(self) | {"gbs": self.gbs}


def default_threads() -> int:
    """The CPUs this process may run on: the thread count every engine in a speed run gets."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def measure_bandwidth(mb: int = BANDWIDTH_MB, repeats: int = BANDWIDTH_REPEATS, threads: int = 1) -> Bandwidth:
    """Best of ``repeats``: ``a.sum()`` over ``mb`` MB of float32 (read), and ``np.copyto(b, a)`` (read + write),
    each split into ``threads`` equal slices summed or copied side by side (numpy releases the GIL in both).

    Measure on the threads the decode runs use: one core alone may not saturate the memory bus, so a one-thread
    figure can put the ceiling below what a multi-threaded decode reaches.
    """
    n = mb * 2**20 // 4
    a = np.ones(n, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)  # touch every page before timing
    cuts = np.linspace(0, n, threads + 1).astype(int)
    parts = list(zip(cuts[:-1], cuts[1:]))
    read = copy = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        def timed(fn) -> float:
            t = time.perf_counter()
            list(pool.map(fn, parts))
            return time.perf_counter() - t

        for _ in range(repeats):
            read = min(read, timed(lambda p: a[p[0]:p[1]].sum()))
            copy = min(copy, timed(lambda p: np.copyto(b[p[0]:p[1]], a[p[0]:p[1]])))
    what = "one thread" if threads == 1 else f"{threads} threads, one slice each"
    return Bandwidth(a.nbytes / read / 1e9, 2 * a.nbytes / copy / 1e9,
                     f"numpy, {what}, {mb} MB float32, best of {repeats}: a.sum() (read) and np.copyto (read + write)")


# ---------------------------------------------------------------------------------------------------- bytes per token
# Ops that look one row of their table up per token instead of reading all of it.
_LOOKUP_OPS = {"Gather": 0, "GatherBlockQuantized": 0}


def _tensor_bytes(t) -> int:
    import onnx

    if t.HasField("raw_data") or t.data_location == onnx.TensorProto.EXTERNAL:
        count = int(np.prod(t.dims)) if t.dims else 1
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        bits = 4 if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else 8 * itemsize
        return (count * bits + 7) // 8
    return onnx.numpy_helper.to_array(t).nbytes


def _copy_itemsize(node, inits: dict) -> int | None:
    """Bytes per value of the tensor a Cast or DequantizeLinear of a weight writes, None for other nodes."""
    import onnx

    if not node.input or node.input[0] not in inits:
        return None
    if node.op_type == "Cast":
        to = next(a.i for a in node.attribute if a.name == "to")
        return onnx.helper.tensor_dtype_to_np_dtype(to).itemsize
    if node.op_type == "DequantizeLinear":  # the output has the scale's type
        scale = inits.get(node.input[1]) if len(node.input) > 1 else None
        return onnx.helper.tensor_dtype_to_np_dtype(scale.data_type).itemsize if scale is not None else 4
    return None


def graph_decode_bytes(graph, run_copies: bool = False) -> int:
    """Bytes of initializers one decode step of ``graph`` (an onnx GraphProto) reads: all of each weight a
    MatMul/MatMulNBits/... consumes, one row of a table that only Gather-like ops read (the embedding lookup). A
    tied table that the LM head also reads counts in full, as the head streams it every token.

    ``run_copies`` (a graph as ONNX Runtime runs it): a Cast or DequantizeLinear of a weight left in the graph
    writes a full copy every token, which the consumer then reads: its output counts too, at its own type."""
    inits = {t.name: t for t in graph.initializer}
    lookup_only = {name: True for name in inits}
    total = 0
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in inits and _LOOKUP_OPS.get(node.op_type) != k:
                lookup_only[name] = False
        itemsize = _copy_itemsize(node, inits) if run_copies else None
        if itemsize:
            total += int(np.prod(inits[node.input[0]].dims)) * itemsize
    for name, t in inits.items():
        size = _tensor_bytes(t)
        total += size // t.dims[0] if lookup_only[name] and t.dims else size
    return total


def onnx_decode_bytes(model_path: Path) -> int:
    """``graph_decode_bytes`` of the model as stored."""
    import onnx

    return graph_decode_bytes(onnx.load(str(model_path), load_external_data=False).graph)


def onnx_decode_bytes_as_run(model_path: Path) -> int:
    """``graph_decode_bytes`` of the graph ONNX Runtime runs on this CPU: the session's own optimized model (all
    optimizations, as onnxruntime-genai and edgeq load it), saved and counted by the same rule.

    It differs from the stored count where ONNX Runtime changes the weights at load: an FP16 initializer consumed
    by an op with no FP16 kernel on this CPU's execution provider is cast to FP32 once and read at 4 bytes per value
    every token (on x86 a tied FP16 embedding table feeding the LM head's MatMul becomes an FP32 copy of the whole
    table, while the Gather still reads FP16 rows); transposes of weights are folded in, at the same size; a Cast or
    DequantizeLinear of a weight that stays in the graph runs every token and its output counts as well."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgeq-as-run-") as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3  # "serializing an optimized model with NCHWc ...": it is only counted, not shipped
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(Path(tmp) / "run.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "run.onnx.data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        return graph_decode_bytes(onnx.load(str(Path(tmp) / "run.onnx"), load_external_data=False).graph,
                                  run_copies=True)


def gguf_decode_bytes(path: Path) -> int:
    """llama.cpp: every tensor each token, except ``token_embd`` (one row) unless there is no ``output.weight``
    (then the tied table is the head and is read in full)."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    total = 0
    for name, t in tensors.items():
        if name == "token_embd.weight" and "output.weight" in tensors:
            rows = int(t.shape[-1]) if len(t.shape) > 1 else 1  # GGUF lists dims fastest first: [hidden, vocab]
            total += int(t.n_bytes) // rows
        else:
            total += int(t.n_bytes)
    return total


def decode_bytes_per_token(model_path: Path) -> int:
    """As stored."""
    path = Path(model_path)
    return gguf_decode_bytes(path) if path.suffix == ".gguf" else onnx_decode_bytes(path)


def decode_bytes_as_run(model_path: Path) -> int:
    """As this CPU runs it. A GGUF counts as stored: llama.cpp's CPU kernels compute on the quantized blocks
    (repacked for SIMD at most, not widened)."""
    path = Path(model_path)
    return gguf_decode_bytes(path) if path.suffix == ".gguf" else onnx_decode_bytes_as_run(path)


# ---------------------------------------------------------------------------------------------------- encoders
class EncoderTimer:
    """An encoder's session and its sentences' feeds, held so that the same model can be timed again and again
    (``ms_per_sentence``) in one process, beside other models (bench/bench.py's same-process rounds)."""

    def __init__(self, model_path: Path, tokenizer, texts: Sequence[str], seq_len: int, batch: int | None = None,
                 threads: int | None = None) -> None:
        from edgeq.runtime import encode, session

        self.session = session(model_path, fuse_qdq=True, threads=threads)
        names = [i.name for i in self.session.get_inputs()]
        if batch:
            self.feeds = [encode(tokenizer, [t] + [""] * (batch - 1), seq_len, names, "max_length") for t in texts]
        else:
            self.feeds = [encode(tokenizer, [t], seq_len, names) for t in texts]

    def ms_per_sentence(self, warmup: int = 8) -> float:
        """Median ms of one ``session.run`` per sentence, after ``warmup`` runs."""
        for f in self.feeds[:warmup]:
            self.session.run(None, f)
        times = []
        for f in self.feeds:
            t = time.perf_counter()
            self.session.run(None, f)
            times.append(time.perf_counter() - t)
        return 1000 * statistics.median(times)


def encoder_ms_per_sentence(model_path: Path, tokenizer, texts: Sequence[str], seq_len: int,
                            warmup: int = 8, batch: int | None = None, threads: int | None = None) -> float:
    """Median ms of one ``session.run`` per sentence (tokenization excluded), after ``warmup`` runs, in a session
    with ONNX Runtime's default options (as an app loads the model) but ``threads`` intra-op threads if given.
    ``batch``: a static-shape model's batch size; each sentence then fills one batch (the other rows empty text) of
    exactly ``seq_len`` tokens, as the model takes it. Otherwise batch 1, padded to the sentence's own length."""
    return EncoderTimer(model_path, tokenizer, texts, seq_len, batch, threads).ms_per_sentence(warmup)


# ---------------------------------------------------------------------------------------------------- LLMs
@dataclass(frozen=True)
class LLMSpeed:
    prefill_tok_s: float
    decode_tok_s: float
    prompt_tokens: int
    new_tokens: int


def genai_model(package_dir: Path, threads: int | None = None):
    """An onnxruntime-genai model of the package, its decoder session on ``threads`` intra-op threads if given
    (overlaid on the package's genai_config.json in memory; the package is not changed)."""
    import onnxruntime_genai as og

    config = og.Config(str(package_dir))
    if threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def llm_speed(package_dir: Path, prompt_ids: Sequence[int], new_tokens: int, threads: int | None = None) -> LLMSpeed:
    """onnxruntime-genai, CPU EP, greedy: prefill of ``prompt_ids`` (timed), then ``new_tokens`` decode steps
    (EOS held off with min_length so every model decodes the same count). One warm-up run of 4 tokens first."""
    import onnxruntime_genai as og

    model = genai_model(package_dir, threads)

    def run(n: int) -> tuple[float, list[float]]:
        params = og.GeneratorParams(model)
        total = len(prompt_ids) + n
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(list(prompt_ids))
        prefill = time.perf_counter() - t
        steps = []
        while not gen.is_done():
            t = time.perf_counter()
            gen.generate_next_token()
            steps.append(time.perf_counter() - t)
        return prefill, steps

    run(4)
    prefill, steps = run(new_tokens)
    decode = steps[1:] or steps  # the first step only samples from the prefill's logits
    return LLMSpeed(len(prompt_ids) / prefill, len(decode) / sum(decode), len(prompt_ids), len(decode))
