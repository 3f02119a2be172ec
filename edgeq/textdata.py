"""Sample text for calibration and evaluation: the bundled splits and the user's own file.

Formats: ``.jsonl`` with one object per line holding a non-empty string ``text`` (``id`` and ``kind`` optional),
or ``.txt`` with one sample per non-empty line. The bundled ``calibration_data/calibration.jsonl`` and
``evaluation.jsonl`` are disjoint; a user's calibration file that shares a text with the evaluation split is refused,
because accuracy measured on text the model was calibrated on flatters it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from edgeq.errors import CalibrationDataError

DATA_DIR = Path(__file__).resolve().parent.parent / "calibration_data"
CALIBRATION_FILE = DATA_DIR / "calibration.jsonl"
EVALUATION_FILE = DATA_DIR / "evaluation.jsonl"


@dataclass(frozen=True)
class TextSet:
    """Texts read from one file, with the file's sha256 for the manifest."""

    path: Path
    sha256: str
    texts: tuple[str, ...]

    def head(self, n: int) -> tuple[str, ...]:
        return self.texts[:n]


def load_texts(path: Path) -> TextSet:
    path = Path(path)
    if not path.is_file():
        raise CalibrationDataError(f"text file {path} does not exist", "pass an existing .jsonl or .txt file")
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise CalibrationDataError(f"{path} is not a text file (it holds NUL bytes)", _FORMAT_HINT)
    try:
        content = raw.decode("utf-8-sig")  # a BOM from Windows editors is not text
    except UnicodeDecodeError as exc:
        raise CalibrationDataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})", _FORMAT_HINT) from exc
    if path.suffix == ".jsonl":
        texts = _parse_jsonl(path, content)
    elif path.suffix == ".txt":
        texts = [line.strip() for line in content.splitlines() if line.strip()]
    else:
        raise CalibrationDataError(f"{path}: unsupported extension '{path.suffix}'", _FORMAT_HINT)
    if not texts:
        raise CalibrationDataError(f"{path} holds no text samples", _FORMAT_HINT)
    return TextSet(path=path, sha256=hashlib.sha256(raw).hexdigest(), texts=tuple(texts))


_FORMAT_HINT = (
    "give a UTF-8 .jsonl file with one {\"text\": \"...\"} object per line, or a .txt file with one sample per "
    "line (see calibration_data/README.md)"
)


def _parse_jsonl(path: Path, content: str) -> list[str]:
    texts = []
    # split on \n only: JSON strings may hold U+2028 and friends, which str.splitlines() would break on
    for lineno, line in enumerate(content.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationDataError(f"{path}:{lineno}: not valid JSON ({exc.msg})", _FORMAT_HINT) from exc
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise CalibrationDataError(f"{path}:{lineno}: no non-empty string field 'text'", _FORMAT_HINT)
        texts.append(text)
    return texts


def check_disjoint(calibration: TextSet, evaluation: TextSet) -> None:
    """Refuse calibration text that is also evaluation text (compared after whitespace/case normalisation)."""

    def norm(t: str) -> str:
        return " ".join(t.lower().split())

    shared = {norm(t) for t in calibration.texts} & {norm(t) for t in evaluation.texts}
    if shared:
        example = next(iter(shared))[:60]
        raise CalibrationDataError(
            f"{len(shared)} calibration text(s) also appear in the evaluation split {evaluation.path} "
            f"(e.g. '{example}')",
            "remove them from the calibration file: accuracy must be measured on text the model was not calibrated on",
        )
