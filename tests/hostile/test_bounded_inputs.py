"""Bounded work on any input: a huge calibration line is tokenized only as far as the windows need, once; numbers
that are not finite, or that the model or the text cannot meet, fail before any work with ``error:`` + ``hint:``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerBase

from cli_results import assert_user_error, edgeq
from edgeq.textdata import CALIBRATION_FILE, CHARS_PER_TOKEN
from profile_edits import edited_profile

LONG_LINE_CHARS = 2_000_000  # on main each tokenizer call took the whole line: ~30 calls of 2 MB each


def calibration_texts(n: int) -> list[str]:
    return [json.loads(line)["text"] for line in CALIBRATION_FILE.read_text().splitlines()[:n]]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


# --- one huge calibration line -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def long_line_export(tiny_bert_dir, tmp_path_factory):
    """The tiny BERT exported on 12 normal texts plus one 2 MB line, every tokenizer call recorded: (result, OUT,
    the input length of each call, how many calls saw the long line)."""
    tmp = tmp_path_factory.mktemp("long-line")
    normal = calibration_texts(12)
    body = " ".join(calibration_texts(400))
    long_line = (body + " ") * (LONG_LINE_CHARS // len(body) + 1)
    cal = write_jsonl(tmp / "long.jsonl", [long_line[:LONG_LINE_CHARS]] + normal)
    lengths, long_calls = [], []
    real_call = PreTrainedTokenizerBase.__call__

    def recording_call(self, text=None, *args, **kwargs):
        texts = [text] if isinstance(text, str) else list(text or [])
        lengths.append(max((len(t) for t in texts), default=0))
        long_calls.append(any(t.startswith(long_line[:200]) for t in texts))
        return real_call(self, text, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(PreTrainedTokenizerBase, "__call__", recording_call)
    try:
        result = edgeq("export", tiny_bert_dir, "--profile", "android-arm64", "-o", tmp / "out",
                       "--calibration", cal)
    finally:
        mp.undo()
    return result, tmp / "out", lengths, sum(long_calls)


@pytest.mark.encoders
def test_long_calibration_line_is_tokenized_only_as_far_as_the_windows_need(long_line_export):
    result, out, lengths, _ = long_line_export
    assert result.exit_code == 0, result.output
    # 128 tokens per text: the first prefix tried is 128 * CHARS_PER_TOKEN characters, and the tiny vocabulary
    # gives more than a token per 8 characters, so no call sees more than that (the line itself is 2,000,000)
    assert lengths and max(lengths) <= 128 * CHARS_PER_TOKEN, max(lengths)


@pytest.mark.encoders
def test_calibration_text_is_tokenized_a_fixed_number_of_times_not_once_per_layer(long_line_export):
    result, _, _, long_calls = long_line_export
    assert result.exit_code == 0, result.output
    # calibrate, the sensitivity feeds and the selection feeds: one prefix search and one batch each. The tiny
    # BERT has 12 linear layers; main tokenized the line once per layer and once per selection step (16 calls).
    assert long_calls <= 6, long_calls


@pytest.mark.encoders
def test_default_sample_count_above_the_file_is_a_note_and_recorded(long_line_export):
    result, out, _, _ = long_line_export
    assert result.exit_code == 0, result.output
    assert "note: " in result.stderr and "holds 13 calibration texts, fewer than the profile's " \
        "quantization.calibration_samples = 128; calibrating on 13" in result.stderr
    manifest = json.loads((out / "tiny-bert-android-arm64" / "manifest.json").read_text())
    assert manifest["calibration"]["samples"] == 13
    assert manifest["profile"]["values"]["quantization"]["calibration_samples"] == 13


# --- calibration text the run cannot use ---------------------------------------------------------------------------


def test_calibration_folder_is_named_a_folder(tiny_bert_dir, tmp_path):
    folder = tmp_path / "texts.jsonl"
    folder.mkdir()
    msg, hint = assert_user_error(edgeq("export", tiny_bert_dir, "--profile", "android-arm64", "-o", tmp_path / "out",
                                        "--calibration", folder), tmp_path / "out")
    assert msg == f"{folder} is a folder, not a file"
    assert ".jsonl or .txt file" in hint


def test_explicit_samples_above_the_file_is_an_error(tiny_bert_dir, tmp_path):
    cal = write_jsonl(tmp_path / "three.jsonl", calibration_texts(3))
    msg, hint = assert_user_error(edgeq("export", tiny_bert_dir, "--profile", "android-arm64", "-o", tmp_path / "out",
                                        "--calibration", cal, "--samples", 128), tmp_path / "out")
    assert msg == f"--samples 128 asks for more calibration texts than {cal} holds (3)"
    assert hint == "pass --samples 3, or a calibration file with at least 128 texts"


def test_samples_set_in_a_profile_override_above_the_file_is_an_error(tiny_bert_dir, tmp_path):
    cal = write_jsonl(tmp_path / "three.jsonl", calibration_texts(3))
    msg, hint = assert_user_error(edgeq("export", tiny_bert_dir, "--profile", "android-arm64", "-o", tmp_path / "out",
                                        "--calibration", cal, "--set", "quantization.calibration_samples=64"),
                                  tmp_path / "out")
    assert "--set quantization.calibration_samples=64" in msg and "(3)" in msg
    assert hint.startswith("pass --set quantization.calibration_samples=3")


def test_llm_calibration_text_too_short_for_its_windows_fails_before_the_export(tiny_dir, tmp_path, monkeypatch):
    from edgeq.recipes import causal_lm

    def no_work(*args, **kwargs):
        raise AssertionError("the weights were read before the calibration text was checked")

    monkeypatch.setattr(causal_lm, "checked_weights", no_work)
    monkeypatch.setattr(causal_lm, "measure", no_work)
    cal = write_jsonl(tmp_path / "short.jsonl", calibration_texts(8))  # about 400 tokens
    msg, hint = assert_user_error(edgeq("export", tiny_dir, "--profile", "android-arm64", "-o", tmp_path / "out",
                                        "--calibration", cal, "--set", "llm.window_tokens=128",
                                        "--set", "llm.context_length=128"), tmp_path / "out", empty_out=True)
    filled = int(msg.split("fills ")[1].split(" ")[0])
    assert 0 < filled < 8
    assert msg == (f"the calibration text fills {filled} windows of 128 tokens; the profile asks for "
                   "llm.calibration_windows = 8")
    assert hint == f"pass a longer --calibration file, or --set llm.calibration_windows={filled}"


def test_samples_flag_on_a_causal_lm_is_refused(tiny_dir, tmp_path):
    msg, hint = assert_user_error(edgeq("export", tiny_dir, "--profile", "android-arm64", "-o", tmp_path / "out",
                                        "--samples", 16), tmp_path / "out")
    assert "--samples counts calibration texts for encoders" in msg
    assert "llm.calibration_windows" in hint


# --- numbers that are not finite -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "+nan", "1e400"])
def test_non_finite_profile_field_in_a_toml_is_refused(tiny_bert_dir, tmp_path, value):
    profile = edited_profile(tmp_path, r"^calibration_percentile = .*$", f"calibration_percentile = {value}")
    msg, hint = assert_user_error(edgeq("export", tiny_bert_dir, "--profile", profile, "-o", tmp_path / "out"),
                                  tmp_path / "out")
    assert "'quantization.calibration_percentile'" in msg and "is not a finite number" in msg
    assert str(float(value)) in msg
    assert hint.startswith("set a number between 90.0 and 100.0: Percentile")


@pytest.mark.parametrize("setting", ["llm.promote=nan", "llm.max_ppl_increase=inf", "accuracy.min_mean_cosine=-inf",
                                     "package.max_size_ratio=nan", "llm.max_size_mb=1e999"])
def test_non_finite_set_override_is_refused(tiny_dir, tmp_path, setting):
    key = setting.split("=")[0]
    msg, _ = assert_user_error(edgeq("export", tiny_dir, "--profile", "android-arm64", "-o", tmp_path / "out",
                                     "--set", setting), tmp_path / "out")
    assert f"'{key}'" in msg and "is not a finite number" in msg


@pytest.mark.parametrize("value", ["nan", "inf", "NaN", "1e400"])
def test_non_finite_max_size_mb_is_a_usage_error(tiny_dir, tmp_path, value):
    msg, hint = assert_user_error(edgeq("export", tiny_dir, "--profile", "android-arm64", "-o",
                                        tmp_path / "out", "--max-size-mb", value), tmp_path / "out")
    assert msg == f"Invalid value for '--max-size-mb': '{value}' is not a finite number."
    assert hint == "see 'edgeq export --help'"


# --- lengths the model cannot take ---------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["llm.window_tokens", "llm.context_length"])
def test_length_above_max_position_embeddings_fails_before_any_export(tiny_dir, tmp_path, key):
    limit = json.loads((tiny_dir / "config.json").read_text())["max_position_embeddings"]
    other = "llm.context_length" if key == "llm.window_tokens" else "llm.window_tokens"
    out = tmp_path / "out"
    msg, hint = assert_user_error(edgeq("export", tiny_dir, "--profile", "android-arm64", "-o", out,
                                        "--set", f"{key}={limit * 2}", "--set", f"{other}=128"), out)
    assert msg == f"{key} = {limit * 2} exceeds the model's max_position_embeddings {limit}"
    assert hint == f"pass --set {key}={limit} (or less)"
    assert not list(tmp_path.rglob("*.onnx"))  # refused before the export wrote anything


def test_window_above_a_gguf_context_length_fails_before_dequantizing(tmp_path):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    w.add_name("tiny llama")
    w.add_context_length(64)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))  # never dequantized: refused before
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "out"
    msg, hint = assert_user_error(edgeq("export", tmp_path, "--gguf-file", "m.gguf", "--profile", "android-arm64",
                                        "-o", out, "--set", "llm.context_length=64"), out)
    assert msg == "llm.window_tokens = 512 exceeds the model's llama.context_length (GGUF metadata) 64"
    assert hint == "pass --set llm.window_tokens=64 (or less)"
