"""edgeq.textdata: the calibration/evaluation text formats, every refused input, and the disjointness check."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from edgeq.errors import CalibrationDataError, UserInputError
from edgeq.profiles import load_profile
from edgeq.textdata import (CALIBRATION_FILE, CHARS_PER_TOKEN, EVALUATION_FILE, TextSet, check_disjoint,
                            fit_calibration_samples, load_texts, token_prefix)


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
    err = refused(tmp_path, rf"^{re.escape(str(tmp_path))} is a folder, not a file$")
    assert "not the folder" in err.hint


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


# --- token_prefix: long texts cut before tokenization ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """The tiny BERT's WordPiece and the tiny Llama's byte-level BPE (both trained on the bundled text)."""
    from transformers import AutoTokenizer

    from llm.tiny_llama import write_tokenizer as write_bpe
    from tiny_models import write_tokenizer as write_wordpiece

    out = {}
    for name, write in (("wordpiece", write_wordpiece), ("byte-level-bpe", write_bpe)):
        folder = tmp_path_factory.mktemp(name)
        write(folder)
        out[name] = AutoTokenizer.from_pretrained(str(folder))
    return out


def hostile_text(seed: int, pieces: int) -> str:
    """Bundled text broken up with what makes characters per token unpredictable: whitespace runs, combining
    accents a normalizer drops, 150-character words, CJK, emoji, control and zero-width characters."""
    import random

    rng = random.Random(seed)
    words = " ".join(load_texts(CALIBRATION_FILE).texts[:50]).split(" ")
    odd = ["\u0301" * 40, "e\u0301", "x" * 150, "\t", "\n\n\n", "\u3000", "日本語のテキスト", "🙂🙂", "\x00", "\u200b",
           "don't", "'s", " " * 500]
    seps = [" ", " ", " ", "  ", "\n", " \t ", "", "      "]
    return "".join(rng.choice(words + odd) + rng.choice(seps) for _ in range(pieces))


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("seq_len", [8, 128])
def test_token_prefix_keeps_the_first_tokens_exactly(tokenizers, seed, seq_len):
    text = hostile_text(seed, 3000)
    for name, tok in tokenizers.items():
        cut = token_prefix(tok, text, seq_len)
        assert len(cut) < len(text), name
        whole = tok(text, add_special_tokens=False, verbose=False)["input_ids"][:seq_len]
        assert tok(cut, add_special_tokens=False, verbose=False)["input_ids"][:seq_len] == whole, name
        # and what encoders feed the model: truncated with special tokens
        assert tok([cut], truncation=True, max_length=seq_len)["input_ids"] == \
            tok([text], truncation=True, max_length=seq_len)["input_ids"], name


def test_token_prefix_leaves_short_text_alone_without_tokenizing():
    class Refuses:
        def __call__(self, *args, **kwargs):
            raise AssertionError("a text shorter than the first prefix needs no tokenization")

    text = "word " * (128 * CHARS_PER_TOKEN // 5)
    assert token_prefix(Refuses(), text, 128) is text


def test_token_prefix_grows_past_characters_that_make_no_tokens(tokenizers):
    """A megabyte of whitespace before the words: no prefix of the first tries holds a token, so the cut grows
    until it holds the words (the whole text here) instead of cutting them off."""
    tok = tokenizers["wordpiece"]
    text = " " * 1_000_000 + "the model reads this text"
    assert token_prefix(tok, text, 4) == text


def test_token_prefix_cost_follows_the_tokens_kept_not_the_text(tokenizers):
    lengths = []

    class Recording:
        def __init__(self, tok):
            self.tok = tok

        def __call__(self, text, **kwargs):
            lengths.append(len(text))
            return self.tok(text, **kwargs)

    text = " ".join(load_texts(CALIBRATION_FILE).texts) * 100  # ~4 MB on one line
    cut = token_prefix(Recording(tokenizers["byte-level-bpe"]), text, 512)
    assert lengths == [len(cut)] and len(cut) <= 512 * CHARS_PER_TOKEN


# --- calibration sample counts against the file ---------------------------------------------------------------------


def test_profile_default_above_the_file_is_cut_with_a_note(tmp_path, capsys):
    cal = text_set(tmp_path, "three.txt", "one text", "another text", "a third")
    profile = fit_calibration_samples(load_profile("android-arm64"), cal, None, {})
    assert profile.quantization.calibration_samples == 3
    assert capsys.readouterr().err == (f"note: {cal.path} holds 3 calibration texts, fewer than the profile's "
                                       "quantization.calibration_samples = 128; calibrating on 3\n")


def test_count_the_file_meets_is_kept_silently(tmp_path, capsys):
    cal = text_set(tmp_path, "three.txt", "one text", "another text", "a third")
    profile = load_profile("android-arm64")
    assert fit_calibration_samples(profile, cal, 3, {}) is profile
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("samples, settings, given, fix", [
    (4, {}, "--samples 4", "--samples 3"),
    (None, {"quantization.calibration_samples": 64}, "--set quantization.calibration_samples=64",
     "--set quantization.calibration_samples=3"),
])
def test_count_asked_for_that_the_file_cannot_meet_is_an_error(tmp_path, samples, settings, given, fix):
    cal = text_set(tmp_path, "three.txt", "one text", "another text", "a third")
    profile = load_profile("android-arm64", overrides=settings)
    with pytest.raises(CalibrationDataError, match=re.escape(f"{given} asks for more calibration texts than "
                                                             f"{cal.path} holds (3)")) as err:
        fit_calibration_samples(profile, cal, samples, settings)
    assert err.value.hint.startswith(f"pass {fix}, or ")


def test_qnn_profile_cuts_its_own_calibration_count(tmp_path, capsys):
    cal = text_set(tmp_path, "three.txt", "one text", "another text", "a third")
    profile = fit_calibration_samples(load_profile("android-qnn-htp"), cal, None, {})
    assert profile.qnn.calibration_samples == 3
    assert "qnn.calibration_samples = 64" in capsys.readouterr().err
