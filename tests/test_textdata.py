"""edgeq.textdata: the calibration/evaluation text formats, every refused input, and the disjointness check."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from edgeq.errors import CalibrationDataError, UserInputError
from edgeq.textdata import CALIBRATION_FILE, EVALUATION_FILE, TextSet, check_disjoint, load_texts


def jsonl(*records) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def text_set(tmp_path, name: str, *texts: str) -> TextSet:
    path = tmp_path / name
    path.write_text("\n".join(texts) + "\n")
    return load_texts(path)


def refused(path, match: str) -> CalibrationDataError:
    with pytest.raises(CalibrationDataError, match=match) as exc:
        load_texts(path)
    assert exc.value.hint, "every refusal carries a hint"
    assert isinstance(exc.value, UserInputError) and exc.value.exit_code == 2
    return exc.value


# --- parsing -------------------------------------------------------------------------------------------------------


def test_jsonl_reads_text_in_order_and_ignores_other_fields_and_blank_lines(tmp_path):
    path = tmp_path / "cal.jsonl"
    path.write_text(
        jsonl({"id": "a", "kind": "prose", "text": "First text."}, {"text": "Zweiter Text, mit Umlaut: ä"})
        + "\n   \n"
        + jsonl({"text": "line one\nline two", "extra": [1, 2]})
    )
    ts = load_texts(path)
    assert ts.texts == ("First text.", "Zweiter Text, mit Umlaut: ä", "line one\nline two")
    assert ts.path == path
    assert ts.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ts.head(2) == ("First text.", "Zweiter Text, mit Umlaut: ä")
    assert ts.head(10) == ts.texts


def test_txt_one_sample_per_non_empty_line_stripped(tmp_path):
    path = tmp_path / "cal.txt"
    path.write_text("  hello world  \n\n\t\nsecond line\r\nthird\n")
    assert load_texts(path).texts == ("hello world", "second line", "third")


def test_missing_file(tmp_path):
    refused(tmp_path / "nope.jsonl", r"does not exist")


def test_folder_is_not_a_text_file(tmp_path):
    refused(tmp_path, r"does not exist")


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.txt"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    err = refused(tmp_path / name, r"holds no text samples")
    assert ".jsonl" in err.hint and ".txt" in err.hint


@pytest.mark.parametrize("name", ["blank.jsonl", "blank.txt"])
def test_whitespace_only_file(tmp_path, name):
    (tmp_path / name).write_text(" \n\t\n\r\n   \n")
    refused(tmp_path / name, r"holds no text samples")


@pytest.mark.parametrize("name", ["data.jsonl", "data.txt"])
def test_binary_file_with_nul_bytes(tmp_path, name):
    (tmp_path / name).write_bytes(b"PK\x03\x04\x00\x00\x08\x00" + bytes(range(256)))
    err = refused(tmp_path / name, r"not a text file \(it holds NUL bytes\)")
    assert "UTF-8" in err.hint


def test_utf16_file_is_caught_by_its_nul_bytes(tmp_path):
    (tmp_path / "utf16.txt").write_bytes("hello\nworld\n".encode("utf-16"))
    refused(tmp_path / "utf16.txt", r"NUL bytes")


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait\nnaïve\n".encode("latin-1"))
    err = refused(path, r"is not UTF-8 text \(invalid continuation byte at byte 3\)")
    assert "UTF-8" in err.hint


def test_bad_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "cal.jsonl"
    path.write_text(jsonl({"text": "ok"}) + "\n" + '{"text": "unterminated\n' + jsonl({"text": "later"}))
    err = refused(path, re.escape(f"{path}:3: not valid JSON"))
    assert "one {\"text\": \"...\"} object per line" in err.hint


@pytest.mark.parametrize(
    "line",
    ['{"id": "x", "kind": "prose"}', '{"text": ""}', '{"text": "   "}', '{"text": 42}', '{"text": null}',
     '["a list", "of text"]', '"a bare string"'],
)
def test_record_without_text(tmp_path, line):
    path = tmp_path / "cal.jsonl"
    path.write_text(jsonl({"text": "fine"}) + line + "\n")
    refused(path, re.escape(f"{path}:2: no non-empty string field 'text'"))


@pytest.mark.parametrize("name", ["cal.csv", "cal.json", "cal", "cal.JSONL"])
def test_unsupported_extension(tmp_path, name):
    path = tmp_path / name
    path.write_text(jsonl({"text": "a"}))
    err = refused(path, r"unsupported extension")
    assert ".jsonl" in err.hint and ".txt" in err.hint


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\x85"])
def test_jsonl_text_may_hold_unicode_line_separators(tmp_path, sep):
    path = tmp_path / "cal.jsonl"
    path.write_text(jsonl({"text": f"first part{sep}second part"}, {"text": "next record"}), encoding="utf-8")
    assert load_texts(path).texts == (f"first part{sep}second part", "next record")


@pytest.mark.parametrize("name, body", [("bom.jsonl", jsonl({"text": "hello"})), ("bom.txt", "hello\n")])
def test_utf8_with_byte_order_mark(tmp_path, name, body):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert load_texts(path).texts == ("hello",)


# --- disjointness --------------------------------------------------------------------------------------------------


def test_check_disjoint_accepts_disjoint_sets(tmp_path):
    cal = text_set(tmp_path, "cal.txt", "the cat sat", "a dog ran")
    ev = text_set(tmp_path, "eval.txt", "the cat sat down", "a bird flew")
    assert check_disjoint(cal, ev) is None


@pytest.mark.parametrize(
    "cal_text",
    ["The Cat Sat", "the  cat\tsat", "  THE CAT SAT  ", "the cat sat"],
)
def test_check_disjoint_refuses_overlap_ignoring_case_and_whitespace(tmp_path, cal_text):
    cal = text_set(tmp_path, "cal.txt", "unrelated text", cal_text)
    ev = text_set(tmp_path, "eval.txt", "a bird flew", "the cat sat")
    with pytest.raises(CalibrationDataError) as exc:
        check_disjoint(cal, ev)
    assert exc.value.message.startswith("1 calibration text(s) also appear in the evaluation split")
    assert str(ev.path) in exc.value.message
    assert "the cat sat" in exc.value.message
    assert "remove them from the calibration file" in exc.value.hint


def test_check_disjoint_counts_every_shared_text(tmp_path):
    cal = text_set(tmp_path, "cal.txt", "one", "two", "three", "four")
    ev = text_set(tmp_path, "eval.txt", "TWO", "four", "five")
    with pytest.raises(CalibrationDataError, match=r"^2 calibration text\(s\)"):
        check_disjoint(cal, ev)


def test_check_disjoint_with_multiline_jsonl_text(tmp_path):
    (tmp_path / "cal.jsonl").write_text(jsonl({"text": "line one\nline two"}))
    (tmp_path / "eval.jsonl").write_text(jsonl({"text": "Line one line two"}))
    with pytest.raises(CalibrationDataError):
        check_disjoint(load_texts(tmp_path / "cal.jsonl"), load_texts(tmp_path / "eval.jsonl"))


# --- the bundled splits --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled() -> tuple[TextSet, TextSet]:
    return load_texts(CALIBRATION_FILE), load_texts(EVALUATION_FILE)


def test_bundled_splits_load_with_enough_texts(bundled):
    cal, ev = bundled
    assert len(cal.texts) >= 300
    assert len(ev.texts) >= 300
    assert all(t.strip() for t in cal.texts + ev.texts)


def test_bundled_splits_are_disjoint(bundled):
    cal, ev = bundled
    check_disjoint(cal, ev)
    norm = lambda t: " ".join(t.lower().split())  # noqa: E731
    assert not {norm(t) for t in cal.texts} & {norm(t) for t in ev.texts}


def test_bundled_splits_have_no_duplicates_within_themselves(bundled):
    for ts in bundled:
        norm = [" ".join(t.lower().split()) for t in ts.texts]
        assert len(set(norm)) == len(norm), ts.path


def test_bundled_eval_split_is_large_enough_for_the_default_profile(bundled):
    from edgeq.profiles import load_profile

    p = load_profile("android-arm64")
    cal, ev = bundled
    assert len(ev.texts) >= p.accuracy.eval_samples
    assert len(cal.texts) >= p.quantization.calibration_samples
