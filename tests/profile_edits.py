"""Profiles that differ from the bundled android-arm64.toml in one line, for tests of bad or strict profiles."""

from __future__ import annotations

import re
from pathlib import Path

BUNDLED = Path(__file__).resolve().parent.parent / "export_profiles" / "android-arm64.toml"


def edited_profile(folder: Path, pattern: str, replacement: str, name: str = "edited.toml") -> Path:
    """Write BUNDLED with the first line matching ``pattern`` (a multiline regex) replaced; fail if none matched."""
    text = BUNDLED.read_text()
    changed = re.sub(pattern, replacement, text, count=1, flags=re.MULTILINE)
    assert changed != text, f"{pattern!r} matched nothing in {BUNDLED}"
    path = Path(folder) / name
    path.write_text(changed)
    return path
