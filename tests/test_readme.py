"""README.md's statements that other files own: held to them here so they cannot drift."""

from __future__ import annotations

import re
from pathlib import Path

from edgeq.families import gguf_archs_exported, supported_gguf_archs

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _listed(pattern: str) -> list[str]:
    m = re.search(pattern, " ".join(README.split()))  # the paragraph's lines joined
    assert m, pattern
    return [name.strip() for name in m.group(1).split(",")]


def test_gguf_architectures_are_the_family_registrys():
    """The architectures --gguf-file reads, and those a test exports end to end (edgeq.families.GGUF_EXPORT)."""
    assert _listed(r"GGUF architectures read: ([\w, ]+);") == supported_gguf_archs()
    assert _listed(r"exported end to end by the tests: ([\w, ]+) \(") == gguf_archs_exported()
