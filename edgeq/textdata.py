"""Sample text for calibration and evaluation: the bundled splits and the user's own file.

Formats: ``.jsonl`` with one object per line holding a non-empty string ``text`` (``id`` and ``kind`` optional),
or ``.txt`` with one sample per non-empty line. The bundled ``calibration_data/calibration.jsonl`` and
``evaluation.jsonl`` are disjoint; a user's calibration file that shares a text with the evaluation split is refused,
because accuracy measured on text the model was calibrated on flatters it.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from edgeq.errors import CalibrationDataError
from edgeq.profiles import QNN_EP, Profile
from edgeq.resources import CALIBRATION_DATA_DIR

CALIBRATION_FILE = CALIBRATION_DATA_DIR / "calibration.jsonl"
EVALUATION_FILE = CALIBRATION_DATA_DIR / "evaluation.jsonl"


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
    if path.is_dir():
        raise CalibrationDataError(f"{path} is a folder, not a file", "pass a .jsonl or .txt file (not the folder "
                                   "that holds it)")
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


def fit_calibration_samples(profile: Profile, calibration: TextSet, samples: int | None,
                            settings: dict[str, object]) -> Profile:
    """The profile with its calibration text count cut to what ``calibration`` holds.

    A count the user asked for (``--samples``, or ``--set`` of the field) that the file cannot meet is an error; the
    profile's own count (128 by default, against a user's small file) is cut to the file's with a note on stderr,
    and the profile recorded in the manifest then states the count used."""
    qnn = profile.execution_provider == QNN_EP
    key = "qnn.calibration_samples" if qnn else "quantization.calibration_samples"
    wanted = samples or (profile.qnn if qnn else profile.quantization).calibration_samples
    count = len(calibration.texts)
    if wanted <= count:
        return profile
    if samples is not None or key in settings:
        given, fix = (f"--samples {wanted}", f"--samples {count}") if samples is not None else \
            (f"--set {key}={wanted}", f"--set {key}={count}")
        raise CalibrationDataError(f"{given} asks for more calibration texts than {calibration.path} holds ({count})",
                                   f"pass {fix}, or a calibration file with at least {wanted} texts")
    print(f"note: {calibration.path} holds {count} calibration texts, fewer than the profile's {key} = {wanted}; "
          f"calibrating on {count}", file=sys.stderr, flush=True)
    if qnn:
        return replace(profile, qnn=replace(profile.qnn, calibration_samples=count))
    return replace(profile, quantization=replace(profile.quantization, calibration_samples=count))


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


# Characters first tried per token wanted: ordinary text is 4-5 characters a token, so one try is enough for it.
CHARS_PER_TOKEN = 8
GROWTH = 4  # each retry quadruples the prefix: all tries together cost at most 4/3 of the last one
_WORD_END = re.compile(r"\S(?=\s)")  # a non-space character with whitespace after it


def token_prefix(tokenizer, text: str, tokens: int) -> str:
    """A prefix of ``text`` whose tokens (no special tokens) start with the first ``tokens`` tokens of the whole
    text's, so that tokenizing it and truncating gives what the whole text gives, at a cost that follows the tokens
    kept, not the text's length (one 11 MB line cost minutes and gigabytes when tokenized whole).

    Why it is exact: the prefix ends only where a whitespace run starts after a non-space character. The tokenizers
    edgeq meets split text into words at whitespace before WordPiece/BPE/Unigram sees it (BERT's BasicTokenizer,
    the GPT-2 byte-level regex, SentencePiece's Metaspace) and never join a non-space character and the whitespace
    after it into one piece, so the prefix tokenizes to exactly the tokens the whole text starts with. No fixed number
    of characters per token bounds the cut: one token can stand for any number of characters (whitespace runs,
    accents or control characters a normalizer drops, a 100+ character word WordPiece reads as one [UNK]). So the
    prefix is tried at ``tokens * CHARS_PER_TOKEN`` characters and grown until it gives ``tokens`` tokens, or is
    the whole text.
    """
    size = tokens * CHARS_PER_TOKEN
    while size < len(text):
        cut = _word_end(text, size)
        if cut and len(tokenizer(text[:cut], add_special_tokens=False, verbose=False)["input_ids"]) >= tokens:
            return text[:cut]
        size *= GROWTH
    return text


def _word_end(text: str, size: int) -> int:
    """The largest cut <= ``size`` with a non-space character before it and whitespace after it; 0 if none."""
    for start in dict.fromkeys((max(0, size - 4096), 0)):  # the last 4 KB almost always hold one; else all of it
        last = None
        for last in _WORD_END.finditer(text, start, size + 1):
            pass
        if last is not None:
            return last.end()
    return 0
