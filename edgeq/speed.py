"""Speed of a model on this machine, and the physical limit it is measured against.

* ``measure_bandwidth``: the machine's memory bandwidth, from numpy over an array far larger than any cache.
* ``decode_bytes_per_token``: the weight bytes one decode step reads (ONNX initializers or GGUF tensors).
* ``encoder_ms_per_sentence``: an encoder at batch 1 on real sentences.
* ``llm_speed``: prefill and decode tokens/s of an onnxruntime-genai package.

Decode of a small LLM at batch 1 reads every weight once per token and does little arithmetic per byte, so
``bandwidth / bytes_per_token`` is the fastest it can go: the decode ceiling.
"""

from __future__ import annotations

import statistics
import time
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


def measure_bandwidth(mb: int = BANDWIDTH_MB, repeats: int = BANDWIDTH_REPEATS) -> Bandwidth:
    """Best of ``repeats``: ``a.sum()`` over ``mb`` MB of float32 (read), and ``np.copyto(b, a)`` (read + write).

    numpy runs both on one thread; one core of a phone or a 2-core VM gets close to the DRAM limit with a streaming
    read, and decode kernels are bound by the same stream.
    """
    n = mb * 2**20 // 4
    a = np.ones(n, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)  # touch every page before timing
    read = copy = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a.sum()
        read = min(read, time.perf_counter() - t)
        t = time.perf_counter()
        np.copyto(b, a)
        copy = min(copy, time.perf_counter() - t)
    return Bandwidth(a.nbytes / read / 1e9, 2 * a.nbytes / copy / 1e9,
                     f"numpy, one thread, {mb} MB float32, best of {repeats}: a.sum() (read) and np.copyto (read + write)")


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


def onnx_decode_bytes(model_path: Path) -> int:
    """Bytes of initializers one decode step reads: all of each weight a MatMul/MatMulNBits/... consumes, one row of
    a table that only Gather-like ops read (the embedding lookup). A tied table that the LM head also reads counts
    in full, as the head streams it every token."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    lookup_only = {name: True for name in inits}
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            if name in inits and _LOOKUP_OPS.get(node.op_type) != k:
                lookup_only[name] = False
    total = 0
    for name, t in inits.items():
        size = _tensor_bytes(t)
        total += size // t.dims[0] if lookup_only[name] and t.dims else size
    return total


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
    path = Path(model_path)
    return gguf_decode_bytes(path) if path.suffix == ".gguf" else onnx_decode_bytes(path)


# ---------------------------------------------------------------------------------------------------- encoders
def encoder_ms_per_sentence(model_path: Path, tokenizer, texts: Sequence[str], seq_len: int,
                            warmup: int = 8, batch: int | None = None) -> float:
    """Median ms of one ``session.run`` per sentence (tokenization excluded), after ``warmup`` runs, in a session
    with ONNX Runtime's default options (as an app loads the model). ``batch``: a static-shape model's batch size;
    each sentence then fills one batch (the other rows empty text) of exactly ``seq_len`` tokens, as the model
    takes it. Otherwise batch 1, padded to the sentence's own length."""
    from edgeq.runtime import encode, session

    sess = session(model_path, fuse_qdq=True)
    names = [i.name for i in sess.get_inputs()]
    if batch:
        feeds = [encode(tokenizer, [t] + [""] * (batch - 1), seq_len, names, "max_length") for t in texts]
    else:
        feeds = [encode(tokenizer, [t], seq_len, names) for t in texts]
    for f in feeds[:warmup]:
        sess.run(None, f)
    times = []
    for f in feeds:
        t = time.perf_counter()
        sess.run(None, f)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


# ---------------------------------------------------------------------------------------------------- LLMs
@dataclass(frozen=True)
class LLMSpeed:
    prefill_tok_s: float
    decode_tok_s: float
    prompt_tokens: int
    new_tokens: int


def llm_speed(package_dir: Path, prompt_ids: Sequence[int], new_tokens: int) -> LLMSpeed:
    """onnxruntime-genai, CPU EP, greedy: prefill of ``prompt_ids`` (timed), then ``new_tokens`` decode steps
    (EOS held off with min_length so every model decodes the same count). One warm-up run of 4 tokens first."""
    import onnxruntime_genai as og

    model = og.Model(str(package_dir))

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
