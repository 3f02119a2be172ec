"""The greedy continuation an LLM package stores for ``edgeq verify``: its prompt, the logit margins along it,
and how two token lists are compared."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgeq.llm.evaluate import window_logits
from edgeq.runtime import session

# A fixed chat prompt whose greedy continuation is stored for `edgeq verify` and compared across devices. It asks
# for a continuation with clear margins between the top two next tokens: greedy equality across CPUs then tests the
# kernels, not a coin toss at a near-tie. Measured on SmolLM2-135M's default package: "What is the capital of France?
# Answer in one sentence." has a 0.29-logit gap at its first token ("Paris" vs "The") and 0.06 at its 11th, and
# aarch64 ORT (MatMulNBits accuracy_level 4, int8 activations) took the other branch at position 0; counting has a
# smallest gap of 0.95 over 16 tokens, and arm64 gave the same 16 tokens as x86.
VERIFY_PROMPT = "Count from 1 to 20, separated by commas."


def match_tokens(got: list[int], want: list[int], margins: list[float] | None = None) -> tuple[bool, str]:
    """(equal, a line saying so or where they first differ, with the reference's top-2 logit gap there if known:
    a small gap means a near-tie flipped, a large one a kernel computing something else)."""
    same = got == want
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    if same:
        return True, f"{len(got)} greedy tokens equal the reference"
    gap = f" (the reference's top-2 logit gap there: {margins[first]:.3f})" if margins and first < len(margins) else ""
    return False, f"greedy tokens differ from position {first}{gap}: {got} vs {want}"


def greedy_margins(model: Path, prompt_ids: list[int], tokens: list[int]) -> list[float]:
    """Logit gap between the top two next tokens at every greedy step (teacher-forced over prompt + tokens)."""
    logits = window_logits(session(model), np.asarray(list(prompt_ids) + list(tokens[:-1]), dtype=np.int64))
    top2 = np.sort(logits[len(prompt_ids) - 1:], axis=-1)[:, -2:]
    return [round(float(b - a), 4) for a, b in top2]
