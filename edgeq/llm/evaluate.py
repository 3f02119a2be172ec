"""LLM accuracy: perplexity, KL(FP32 || quantized) and top-1 next-token agreement over fixed token windows.

Every window is one full forward with an empty KV cache (past length 0), so the number depends on the weights and
nothing else. The vocabulary makes logits big (SmolLM2: 512 x 49152 x 4 bytes = 100 MB per window), so nothing is
held for more than one window: the FP32 reference is computed once into log-probabilities on disk
(``ReferenceLogits``, memory-mapped, read back one window at a time) and every statistic is a running sum over
row chunks of ``CHUNK`` positions (64 x 49152 float64 = 25 MB of temporaries).
"""

from __future__ import annotations

import itertools
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from edgeq.errors import CalibrationDataError
from edgeq.llm.parts import PartedModel, input_feeds, parted_logits
from edgeq.progress import QUIET, Progress
from edgeq.runtime import session
from edgeq.textdata import token_prefix

WINDOW = 512  # tokens per window: long enough that most predictions see real context
CALIBRATION_WINDOWS = 8  # 4096 tokens: H = X^T X of a 1536-wide layer is then well determined (4096 > 1536 rows)
EVALUATION_WINDOWS = 16  # 8176 predicted tokens: the perplexity's standard error is then ~1-2%
CHUNK = 64  # positions per log-softmax chunk, at most; fewer for a large vocabulary (``chunk_rows``)
CHUNK_VALUES = 1 << 22  # float64 values per log-softmax temporary: 32 MB (64 x 128k-vocabulary rows took 66 MB each)
RUN_TOKENS = 64  # positions per forward of a model with a KV cache (``logit_chunks``)
MAX_GRAPH_ONLY = 64 << 20  # a model.onnx above this holds its weights: not an edgeq package, run whole
BOOTSTRAP_RESAMPLES = 2000  # the 2.5/97.5% quantiles of 2000 resamples move by < 0.1 point between seeds



@dataclass(frozen=True)
class LMAccuracy:
    """``ppl_increase`` is a fraction (0.06 = +6%); ``mean_kl`` is in nats per predicted token.

    ``ppl_increase_interval`` is the 95% paired bootstrap interval of ``ppl_increase`` over the windows: how far the
    figure would move on other text of the same kind (windows resampled with replacement, the same windows for both
    models). It is the noise against which two measurements on different text should be compared."""

    perplexity: float
    ref_perplexity: float
    ppl_increase: float
    mean_kl: float
    top1_agreement: float
    tokens: int
    ppl_increase_interval: tuple[float, float] | None = None  # None: fewer than two windows


def token_windows(tokenizer, texts: Sequence[str], seq_len: int = WINDOW, max_windows: int | None = None) -> np.ndarray:
    """Texts joined with blank lines, tokenized once, cut into whole windows -> int64 [n, seq_len].

    No BOS: a window cut from the middle of a stream has none either, and every window is treated alike. With
    ``max_windows`` only the prefix of the text those windows need is tokenized (``token_prefix``), however long
    the text is.
    """
    text = "\n\n".join(texts)
    if max_windows is not None:
        text = token_prefix(tokenizer, text, max_windows * seq_len)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise CalibrationDataError(f"the text gives {len(ids)} tokens, fewer than one window of {seq_len}",
                                   f"give at least {seq_len} tokens of text (several paragraphs)")
    return np.asarray(ids[: n * seq_len], dtype=np.int64).reshape(n, seq_len)


def lm_session(model: onnx.ModelProto | Path | str) -> ort.InferenceSession:
    """A session for whole-window forwards. No arena: a 1B package's session held 3.3 GB after two windows with it,
    2.4 GB without (measured on x86, where ORT also keeps the FP16 tied head as a 1 GB FP32 constant)."""
    return model if isinstance(model, ort.InferenceSession) else session(model, arena=False)


def window_feeds(sess: ort.InferenceSession, ids: np.ndarray, start: int = 0) -> dict[str, np.ndarray]:
    """Feeds for ``ids`` [S] at positions ``start``.. of a window (``input_feeds`` over the session's inputs)."""
    return input_feeds(sess.get_inputs(), ids, start)


def window_logits(sess: ort.InferenceSession, ids: np.ndarray) -> np.ndarray:
    """Logits [S, V] of one window."""
    return sess.run(["logits"], window_feeds(sess, ids))[0][0]


def logit_chunks(sess: ort.InferenceSession, ids: np.ndarray,
                 run_tokens: int = RUN_TOKENS) -> Iterator[tuple[int, np.ndarray]]:
    """(first position, logits [n, V]) of one window [S], ``run_tokens`` positions per forward, each run feeding the
    previous runs' KV cache back (``present.*`` -> ``past_key_values.*``, kept as ONNX Runtime values, never copied
    into numpy), as a chunked prefill does.

    One 512-token forward of an 8B package (128k vocabulary) raised the evaluate stage's RSS 0.9 GB above its
    session's 7.4 GB: logits, their copy into numpy and the activations of 512 positions. Measured on that package
    (3 windows, fresh process): peak 7.90 GB with 128 positions a run, 7.83 GB with 64, at the same speed; over all
    16 windows 7.97 GB with 128. What is left above the session is mostly the KV cache, past and present. The logits
    are the same: a SmolLM2 package gave bit-identical logits either way (ORT's GroupQueryAttention over past + new
    keys). A model without a KV cache runs the window at once."""
    ids = np.asarray(ids)
    past = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values")]
    if not past or len(ids) <= run_tokens:
        yield 0, window_logits(sess, ids)
        return
    names = ["logits", *(n.replace("past_key_values", "present") for n in past)]
    cache: dict[str, ort.OrtValue] = {}
    for start in range(0, len(ids), run_tokens):
        feeds = window_feeds(sess, ids[start:start + run_tokens], start)
        values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()} | cache
        logits, *present = sess.run_with_ort_values(names, values)
        del values
        cache = dict(zip(past, present))
        out = logits.numpy()[0]
        del logits
        yield start, out
        del out


def parted(model: onnx.ModelProto | Path | str | ort.InferenceSession) -> PartedModel | None:
    """A package's graph in layer parts (edgeq/llm/parts.py) when it is larger than one part, else None."""
    if isinstance(model, (str, Path)) and Path(model).stat().st_size <= MAX_GRAPH_ONLY:
        parts = PartedModel(Path(model))
        if len(parts) > 1:
            return parts
    return None


def package_runner(model: onnx.ModelProto | Path | str | ort.InferenceSession) -> ort.InferenceSession | PartedModel:
    """The package in parts when it is larger than one (``parted``), else one session."""
    return parted(model) or lm_session(model)


def sequence_logits(runner: ort.InferenceSession | PartedModel, ids: np.ndarray) -> np.ndarray:
    """Logits [S, V] of one sequence [S] in one run (no KV cache carried between runs)."""
    if isinstance(runner, PartedModel):
        return next(parted_logits(runner, np.asarray(ids)[None], len(ids)))[2]
    return window_logits(runner, ids)


def _rows(logits_of, windows: np.ndarray, progress: Progress) -> Iterator[tuple[int, int, np.ndarray]]:
    """(window, first position, logits) blocks of every window, in order: from a session (``logit_chunks``), a
    parted package (``parted_logits``) or a function of the ids."""
    if isinstance(logits_of, PartedModel):
        yield from parted_logits(logits_of, windows, RUN_TOKENS, progress)
        return
    for i, ids in enumerate(windows):
        if isinstance(logits_of, ort.InferenceSession):
            for first, logits in logit_chunks(logits_of, ids, RUN_TOKENS):
                yield i, first, logits
        else:
            yield i, 0, logits_of(ids)


def chunk_rows(vocab: int) -> int:
    """Positions per statistics chunk: ``CHUNK``, fewer when its float64 temporaries would pass ``CHUNK_VALUES``."""
    return max(1, min(CHUNK, CHUNK_VALUES // max(vocab, 1)))


def log_softmax(logits: np.ndarray, dtype=np.float64) -> np.ndarray:
    """Log-probabilities over the last axis, computed in float64 a block of rows at a time and stored as ``dtype``:
    a whole 512-token window of a 128k vocabulary in float64 took three 525 MB temporaries."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = np.empty(flat.shape, dtype)
    step = chunk_rows(flat.shape[-1])
    for r in range(0, len(flat), step):
        x = flat[r:r + step].astype(np.float64)
        x -= x.max(axis=-1, keepdims=True)
        out[r:r + step] = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return out.reshape(logits.shape)


class ReferenceLogits:
    """FP32 next-token log-probabilities of every window, computed once and kept on disk as float32 ``.npy``.

    Float32, not float16: a log-probability of -10 in float16 is off by up to 0.004, as large as the KL of a good
    INT4 model. Use as a context manager (or call ``close``) to delete the files.
    """

    def __init__(self, model: onnx.ModelProto | Path | str | ort.InferenceSession | None, windows: np.ndarray,
                 directory: Path | None = None, progress: Progress = QUIET) -> None:
        self._tmp = None if directory else tempfile.TemporaryDirectory(prefix="edgeq-ref-")
        self.directory = Path(directory or self._tmp.name)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.windows = np.asarray(windows)
        if model is None:
            return  # from_logprobs writes the windows
        sess = lm_session(model)
        self._write((log_softmax(window_logits(sess, ids), np.float32) for ids in self.windows), progress)

    @classmethod
    def from_logprobs(cls, windows: np.ndarray, logprobs: Iterable[np.ndarray], directory: Path | None = None,
                      progress: Progress = QUIET) -> "ReferenceLogits":
        """Log-probabilities computed elsewhere (layer by layer, edgeq.decoder.layerwise), one window at a time."""
        ref = cls(None, windows, directory)
        ref._write(logprobs, progress)
        return ref

    def _write(self, logprobs: Iterable[np.ndarray], progress: Progress) -> None:
        n = 0
        for n, lp in enumerate(logprobs, 1):
            np.save(self._path(n - 1), np.asarray(lp, np.float32))
            progress.step("reference window", n, len(self.windows))
        if n != len(self.windows):
            raise ValueError(f"{n} windows of reference log-probabilities for {len(self.windows)} windows")

    def _path(self, i: int) -> Path:
        return self.directory / f"window_{i:03d}.npy"

    def logprobs(self, i: int) -> np.ndarray:
        return np.load(self._path(i), mmap_mode="r")

    def rows(self, i: int, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of window ``i``, read from the file rather than mapped: a mapped window's pages stay in
        the process's RSS until it is unmapped (a 512-token window of a 128k vocabulary: 262 MB, a quarter GB added
        to the evaluate stage's peak on the 1B shape)."""
        with open(self._path(i), "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(f)
            if fortran or len(shape) != 2:
                raise ValueError(f"{self._path(i)}: a C-ordered 2-D array expected, found shape {shape}")
            stop = min(stop, shape[0])
            f.seek(start * shape[1] * dtype.itemsize, 1)
            return np.fromfile(f, dtype=dtype, count=max(stop - start, 0) * shape[1]).reshape(-1, shape[1])

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> "ReferenceLogits":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def evaluate_lm(model: onnx.ModelProto | Path | str | ort.InferenceSession | Callable[[np.ndarray], np.ndarray],
                reference: ReferenceLogits | onnx.ModelProto | Path | str | ort.InferenceSession,
                windows: np.ndarray, progress: Progress = QUIET) -> LMAccuracy:
    """Compare ``model`` with the reference (precomputed ``ReferenceLogits`` or a reference model run per window).

    ``model`` may also be a function from one window's ids [S] to its logits [S, V]: another runtime (llama.cpp in
    bench/) is then measured by exactly the same statistics."""
    windows = np.asarray(windows)
    if isinstance(reference, ReferenceLogits) and not np.array_equal(reference.windows, windows):
        raise ValueError("the reference log-probabilities were computed on other windows")
    logits_of = model if callable(model) else package_runner(model)  # a session is not callable
    ref_sess = None if isinstance(reference, ReferenceLogits) else lm_session(reference)
    nll = ref_nll = kl = 0.0
    agree = tokens = 0
    per_window = []  # (nll, ref_nll, tokens) of each window, for the bootstrap interval
    for i, blocks in itertools.groupby(_rows(logits_of, windows, progress), key=lambda r: r[0]):
        ids = windows[i]
        before = (nll, ref_nll, tokens)
        ref = None if ref_sess is None else window_logits(ref_sess, ids)
        targets = ids[1:]
        for _, first, logits in blocks:
            # position t predicts token t+1; the window's last position has no target
            step = chunk_rows(logits.shape[-1])
            for c in range(first, min(first + len(logits), len(ids) - 1), step):
                stop = min(c + step, first + len(logits), len(ids) - 1)
                lq = log_softmax(logits[c - first:stop - first])
                lp = np.asarray(reference.rows(i, c, stop) if ref is None else ref[c:stop], np.float64)
                if ref_sess is not None:
                    lp = log_softmax(lp)
                at = np.arange(stop - c)
                t = targets[c:stop]
                nll -= lq[at, t].sum()
                ref_nll -= lp[at, t].sum()
                kl += (np.exp(lp) * (lp - lq)).sum()
                agree += int((lq.argmax(-1) == lp.argmax(-1)).sum())
                tokens += stop - c
            del logits
        per_window.append((nll - before[0], ref_nll - before[1], tokens - before[2]))
        progress.step("evaluation window", i + 1, len(windows))
    ppl, ref_ppl = math.exp(nll / tokens), math.exp(ref_nll / tokens)
    return LMAccuracy(perplexity=ppl, ref_perplexity=ref_ppl, ppl_increase=ppl / ref_ppl - 1.0,
                      mean_kl=max(kl / tokens, 0.0), top1_agreement=agree / tokens, tokens=tokens,
                      ppl_increase_interval=ppl_increase_interval(np.asarray(per_window)))


def ppl_increase_interval(per_window: np.ndarray, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                          seed: int = 0) -> tuple[float, float] | None:
    """Paired bootstrap interval of ppl/ref_ppl - 1 from per-window (nll, ref_nll, tokens) sums [n, 3].

    Windows, not tokens, are resampled: neighbouring tokens share context, so their errors are not independent.
    One window gives no interval (None). Fixed seed: the same measurement always prints the same interval."""
    per_window = np.asarray(per_window, dtype=np.float64)
    n = len(per_window)
    if n < 2:
        return None
    picks = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    sums = per_window[picks].sum(axis=1)  # [resamples, 3]
    increases = np.exp((sums[:, 0] - sums[:, 1]) / sums[:, 2]) - 1.0
    lo, hi = np.quantile(increases, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))
