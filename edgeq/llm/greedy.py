"""The greedy continuation an LLM package stores for ``edgeq verify``: its prompt, the logit margins along it,
and how two token lists are compared."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgeq.errors import ModelFolderError, PackageError, UserInputError
from edgeq.llm.evaluate import package_runner, parted, sequence_logits
from edgeq.llm.genai import check_genai_config, greedy_tokens
from edgeq.llm.parts import parted_greedy
from edgeq.manifest import REEXPORT, package_path
from edgeq.progress import QUIET, Progress

# A fixed chat prompt whose greedy continuation is stored for `edgeq verify` and compared across devices. Counting
# keeps clear margins between the top two next tokens (SmolLM2-135M: smallest gap 0.95 over 16 tokens), so greedy
# equality tests the kernels, not a near-tie; the prompt it replaced: docs/decisions/llm-verify-prompt.md.
VERIFY_PROMPT = "Count from 1 to 20, separated by commas."


def verify_prompt_ids(tokenizer) -> list[int]:
    """VERIFY_PROMPT as one user turn through the source's chat template; the plain text (with the tokenizer's own
    special tokens) for a base model without one, as ``chat_prompt`` does at generation."""
    if getattr(tokenizer, "chat_template", None):
        # return_dict=False: transformers 5 returns a BatchEncoding by default, 4.x the ids
        try:  # transformers renders templates in jinja's sandbox: a stranger's template runs no Python
            ids = tokenizer.apply_chat_template([{"role": "user", "content": VERIFY_PROMPT}],
                                                add_generation_prompt=True, return_dict=False)
        except Exception as e:
            raise ModelFolderError(f"the model's chat template fails on a one-turn chat: {type(e).__name__}: {e}",
                                   "fix chat_template in tokenizer_config.json (or chat_template.jinja), or remove "
                                   "it to export as a base model") from None
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(VERIFY_PROMPT)["input_ids"]]


def match_tokens(got: list[int], want: list[int], margins: list[float] | None = None) -> tuple[bool, str]:
    """(equal, a line saying so or where they first differ, with the reference's top-2 logit gap there if known:
    a small gap means a near-tie flipped, a large one a kernel computing something else)."""
    same = got == want
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    if same:
        return True, f"{len(got)} greedy tokens equal the reference"
    gap = f" (the reference's top-2 logit gap there: {margins[first]:.3f})" if margins and first < len(margins) else ""
    return False, f"greedy tokens differ from position {first}{gap}: {got} vs {want}"


def package_greedy(folder: Path, prompt_ids: Sequence[int], n: int,
                   progress: Progress = QUIET) -> tuple[list[int], str]:
    """(The greedy continuation of the package in ``folder``, what ran it). onnxruntime-genai, as an app runs it;
    a package larger than one part (edgeq/llm/parts.py) runs in ONNX Runtime part after part with genai's search
    (its prompt in one run, then a token per run; equal tokens, by test), so that neither the export nor a host
    check holds the whole package in one session beside its own memory (``edgeq run`` loads it in genai whole)."""
    config = check_genai_config(folder)["model"]
    decoder = config.get("decoder")
    filename = decoder.get("filename") if isinstance(decoder, dict) else None
    if not isinstance(filename, str):
        raise PackageError(f"{folder}'s genai_config.json names no model.decoder.filename", REEXPORT)
    parts = parted(package_path(folder, filename, "the genai_config.json decoder filename"))
    if parts is None:
        return greedy_tokens(folder, prompt_ids, n), "onnxruntime-genai"
    if len(prompt_ids) + n > config["context_length"]:
        raise UserInputError(f"the prompt ({len(prompt_ids)} tokens) plus {n} new tokens exceeds the package's "
                             f"context length {config['context_length']}", "shorten the prompt or ask for fewer tokens")
    eos = config["eos_token_id"]
    eos = {int(eos)} if isinstance(eos, int) else {int(t) for t in eos}
    tokens = parted_greedy(parts, [int(t) for t in prompt_ids], n, eos.__contains__, progress)
    return tokens, f"onnxruntime, the graph in {len(parts)} parts opened in turn for each token"


def greedy_margins(model: Path, prompt_ids: list[int], tokens: list[int]) -> list[float]:
    """Logit gap between the top two next tokens at every greedy step (teacher-forced over prompt + tokens)."""
    logits = sequence_logits(package_runner(model), np.asarray(list(prompt_ids) + list(tokens[:-1]), dtype=np.int64))
    top2 = np.sort(logits[len(prompt_ids) - 1:], axis=-1)[:, -2:]
    return [round(float(b - a), 4) for a, b in top2]
