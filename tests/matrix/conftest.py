"""Models and matrix files for the matrix tests: two tiny random BERTs and one whose weights hold a NaN (its export
fails in the checkpoint check, seconds in: a cell that fails at run time, not in the driver's input checks)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tiny_models import tiny_bert

# calibrate and measure sensitivity on 16 texts: a tiny BERT cell in ~12 s
FAST = ("quantization.calibration_samples=16", "quantization.sensitivity_samples=16")


def matrix_file(path: Path, models: list[str], profiles: list[str], settings=FAST, extra: str = "",
                top: str = "") -> Path:
    """A matrix file at ``path``: ``models`` are [[model]] paths (or whole table bodies, if they hold '=')."""
    tables = "".join(f"\n[[model]]\n{m if '=' in m else f'path = {str(m)!r}'}\n" for m in models)
    path.write_text(f"profiles = {list(profiles)!r}\nset = {list(settings)!r}\n{top}{tables}{extra}")
    return path


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` with its bytes and mtime (ns): what 'the store is unchanged' compares."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def matrix_models(tmp_path_factory) -> Path:
    """models/bert-a (seed 0, hidden 64), models/bert-b (seed 1, hidden 32), models/bert-nan (bert-a with a NaN)."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    root = tmp_path_factory.mktemp("matrix-models")
    tiny_bert(root / "bert-a", seed=0)
    tiny_bert(root / "bert-b", seed=1, hidden=32)
    shutil.copytree(root / "bert-a", root / "bert-nan")
    weights = root / "bert-nan" / "model.safetensors"
    tensors = load_file(str(weights))
    name = next(k for k in sorted(tensors) if k.endswith("dense.weight"))
    tensors[name][0, 0] = np.nan
    save_file(tensors, str(weights))
    return root
