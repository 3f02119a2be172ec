"""llama.cpp rows through llama-cpp-python (the optional ``llamacpp`` extra): logits per window, prefill/decode speed.

Both use the same token ids as the ONNX rows (the Hugging Face tokenizer and the GGUF vocabulary of the source are
the same table), so accuracy is computed by ``edgeq.llm.evaluate.evaluate_lm`` exactly as for every other row.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgeq.speed import LLMSpeed, default_threads


def _load(gguf: Path, n_ctx: int, threads: int | None):
    """``threads`` for both decode and batch (prompt) evaluation: the count the ONNX rows' sessions get."""
    from llama_cpp import Llama

    n = threads or default_threads()
    return Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_threads=n, n_threads_batch=n, logits_all=True,
                 verbose=False)


def window_logits_fn(gguf: Path, window_tokens: int, threads: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """ids [S] -> logits [S, V], each window from an empty KV cache (as the ONNX rows)."""
    llm = _load(gguf, window_tokens, threads)

    def logits(ids: np.ndarray) -> np.ndarray:
        llm.reset()
        llm.eval([int(t) for t in ids])
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    return logits


def speed(gguf: Path, prompt_ids: Sequence[int], new_tokens: int, threads: int | None = None) -> LLMSpeed:
    """Greedy, batch 1: the prompt in one eval (prefill), then one eval per new token (decode); one warm-up first."""
    llm = _load(gguf, len(prompt_ids) + new_tokens + 8, threads)

    def run(n: int) -> tuple[float, list[float]]:
        llm.reset()
        t = time.perf_counter()
        llm.eval(list(prompt_ids))
        prefill = time.perf_counter() - t
        steps = []
        for _ in range(n):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            t = time.perf_counter()
            llm.eval([token])
            steps.append(time.perf_counter() - t)
        return prefill, steps

    run(4)
    prefill, steps = run(new_tokens)
    return LLMSpeed(len(prompt_ids) / prefill, len(steps) / sum(steps), len(prompt_ids), len(steps))
