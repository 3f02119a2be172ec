"""The ``edgeq`` command line: every bad input is an ``error:``/``hint:`` pair with exit status 2, no traceback and
nothing written; ``profiles``, ``inspect`` and ``verify`` on a package exported once for the module.

Click 8.2+ keeps stderr apart in CliRunner (``result.stdout``/``result.stderr``; ``result.output`` interleaves both),
so there is no ``mix_stderr`` argument to pass.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_results import assert_user_error, edgeq
from profile_edits import edited_profile

ROOT = Path(__file__).resolve().parent.parent
PROFILE_FILE = ROOT / "export_profiles" / "android-arm64.toml"
EDGEQ = Path(sys.executable).parent / "edgeq"
PACKAGE_NAME = "tiny-bert-android-arm64"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_config(folder: Path, config: dict, weights: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    if weights:
        (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # never loaded
    return folder


# ---------------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def cli_export(tiny_bert_dir, tmp_path_factory):
    """`edgeq export` of the tiny BERT, run once for the module: (result, OUT)."""
    out = tmp_path_factory.mktemp("cli-out")
    result = edgeq("export", tiny_bert_dir, "--profile", "android-arm64", "-o", out, "--samples", 16)
    return result, out


@pytest.fixture(scope="module")
def package(cli_export) -> Path:
    result, out = cli_export
    assert result.exit_code == 0, result.output
    return out / PACKAGE_NAME


@pytest.fixture(scope="module")
def manifest(package) -> dict:
    return json.loads((package / "manifest.json").read_text())


# ---------------------------------------------------------------------------------------------------- export

@pytest.mark.encoders
def test_export_writes_the_package_and_reports_accuracy(cli_export, package, manifest):
    result, out = cli_export
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [PACKAGE_NAME]  # the zip is inside it
    # stdout carries the result only; progress goes to stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"wrote {package}"
    acc = manifest["accuracy"]
    assert lines[1] == (f"accuracy vs FP32 on 320 held-back texts: mean cosine {acc['mean_cosine']:.5f}, "
                        f"min cosine {acc['min_cosine']:.5f}, retrieval top-1 agreement {acc['retrieval_top1']:.3f}")
    assert len(lines) == 2
    stages = iter(re.findall(r"^\[\s*\d+\.\ds\] (\w+):", result.stderr, re.M))
    for stage in ("export", "calibrate", "quantize", "package", "evaluate", "verify", "done"):
        assert stage in stages, (stage, result.stderr)  # in this order (the iterator is consumed)
    assert manifest["calibration"]["samples"] == 16


@pytest.mark.encoders
def test_export_progress_starts_at_once_and_counts_within_stages(cli_export):
    """Issue 17: 13 s passed before the first line, and optimum's export was one silent stretch. Every progress line
    carries the seconds since the start; steps are indented under their stage."""
    result, _ = cli_export
    lines = result.stderr.splitlines()
    assert re.fullmatch(r"\[\s*0\.\ds\] check: inputs: .*tiny-bert, profile android-arm64, output .*", lines[0])
    assert all(re.match(r"\[\s*\d+\.\ds\] ", line) for line in lines), lines
    steps = [line.split("]", 1)[1] for line in lines if re.match(r"\[\s*\d+\.\ds\]   \S", line)]
    assert "   traced layer 1/2" in steps and "   traced layer 2/2" in steps  # the tiny BERT's 2 layers
    assert "   calibration batch 1/1" in steps and "   smoothed ranges batch 1/1" in steps


def test_the_first_progress_line_comes_before_the_slow_imports():
    """In a fresh process: when 'check' is printed, neither the pipeline nor torch has been imported (they take
    1.5 s warm, over 10 s from a cold disk); the export then fails on its missing folder as usual."""
    code = ("import sys, edgeq.progress as p\n"
            "stage = p.Progress.stage\n"
            "def spy(self, name, detail=''):\n"
            "    print('imported:', [m for m in ('edgeq.pipeline', 'torch', 'onnxruntime') if m in sys.modules],"
            " file=sys.stderr)\n"
            "    stage(self, name, detail)\n"
            "p.Progress.stage = spy\n"
            "from edgeq.cli import main\n"
            "main()\n")
    run = subprocess.run([sys.executable, "-c", code, "export", "nope", "--profile", "android-arm64"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.splitlines()
    assert lines[0] == "imported: []" and re.fullmatch(r"\[\s*0\.\ds\] check: inputs: nope, .*", lines[1]), lines
    assert lines[2].startswith("error: model folder nope does not exist")


@pytest.mark.encoders
def test_quiet_export_prints_no_progress(tiny_bert_dir, tmp_path):
    result = edgeq("export", tiny_bert_dir, "--profile", "android-arm64", "-o", tmp_path, "--samples", 8, "-q")
    assert result.exit_code == 0, result.output
    assert not re.search(r"^\[\s*\d+\.\ds\] |calibration batch", result.stderr, re.M), result.stderr
    assert result.stdout.startswith(f"wrote {tmp_path / PACKAGE_NAME}\n")


# ---------------------------------------------------------------------------------------------------- bad inputs

def test_missing_model_folder(tmp_path):
    out = tmp_path / "out"
    msg, hint = assert_user_error(edgeq("export", tmp_path / "nope", "--profile", "android-arm64", "-o", out), out)
    assert "nope" in msg and "does not exist" in msg
    assert "config.json" in hint


def test_missing_model_folder_through_the_installed_script(tmp_path):
    """The real console script, in a fresh process: same contract as in-process."""
    out = tmp_path / "out"
    run = subprocess.run([str(EDGEQ), "export", str(tmp_path / "nope"), "--profile", "android-arm64", "-o", str(out)],
                         capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stdout == ""
    assert "Traceback" not in run.stderr
    assert re.search(r"^error: model folder .*nope does not exist$", run.stderr, re.M), run.stderr
    assert re.search(r"^hint: \S", run.stderr, re.M), run.stderr
    assert not out.exists()


@pytest.mark.parametrize("extra", [None, "pytorch_model.bin"])
def test_folder_without_safetensors_weights(tmp_path, extra):
    model = write_config(tmp_path / "model-cfg-only", {"model_type": "bert", "architectures": ["BertModel"]}, weights=False)
    if extra:
        (model / extra).write_bytes(b"pickle")
    out = tmp_path / "out"
    msg, hint = assert_user_error(edgeq("export", model, "--profile", "android-arm64", "-o", out), out)
    assert "no safetensors weights" in msg
    assert "model.safetensors" in hint
    if extra:
        assert extra in hint and "safe_serialization=True" in hint  # says how to convert pickle weights


def test_unknown_profile_lists_the_known_ones(tiny_bert_dir, tmp_path):
    out = tmp_path / "out"
    msg, hint = assert_user_error(edgeq("export", tiny_bert_dir, "--profile", "android-arm65", "-o", out), out)
    assert msg == "unknown profile 'android-arm65'"
    assert "android-arm64" in hint and "known profiles" in hint


def test_profile_file_with_a_typo_key(tiny_bert_dir, tmp_path):
    profile = edited_profile(tmp_path, r"^calibration_method =", "calibraton_method =", "typo.toml")
    out = tmp_path / "out"
    msg, hint = assert_user_error(edgeq("export", tiny_bert_dir, "--profile", profile, "-o", out), out)
    assert str(profile) in msg
    assert "quantization.calibraton_method" in msg
    assert "did you mean 'calibration_method'" in hint


def test_profile_file_that_is_not_toml(tiny_bert_dir, tmp_path):
    profile = tmp_path / "broken.toml"
    profile.write_text(PROFILE_FILE.read_text().replace("[quantization]", "[quantization", 1))
    out = tmp_path / "out"
    msg, hint = assert_user_error(edgeq("export", tiny_bert_dir, "--profile", profile, "-o", out), out)
    assert str(profile) in msg and "not valid TOML" in msg


def test_profile_file_with_an_out_of_range_value(tiny_bert_dir, tmp_path):
    profile = edited_profile(tmp_path, r"^calibration_samples = \d+", "calibration_samples = 0", "zero.toml")
    out = tmp_path / "out"
    result = edgeq("export", tiny_bert_dir, "--profile", profile, "-o", out)
    msg, hint = assert_user_error(result)
    assert str(profile) in msg and "quantization.calibration_samples" in msg


def test_causal_lm_without_tokenizer(tmp_path):
    model = write_config(tmp_path / "llama", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    out = tmp_path / "out"
    msg, hint = assert_user_error(edgeq("export", model, "--profile", "android-arm64", "-o", out), out)
    assert "no tokenizer files" in msg and "tokenizer.json" in hint


def test_unknown_model_type(tmp_path):
    model = write_config(tmp_path / "wibble", {"model_type": "wibble", "architectures": ["WibbleModel"]})
    out = tmp_path / "out"
    msg, hint = assert_user_error(edgeq("export", model, "--profile", "android-arm64", "-o", out), out)
    assert "'wibble'" in msg and "not supported" in msg
    assert "bert" in hint and "roberta" in hint


def test_empty_calibration_file(tiny_bert_dir, tmp_path):
    cal = tmp_path / "empty.jsonl"
    cal.write_text("")
    out = tmp_path / "out"
    msg, hint = assert_user_error(
        edgeq("export", tiny_bert_dir, "--profile", "android-arm64", "-o", out, "--calibration", cal), out)
    assert str(cal) in msg and "no text samples" in msg
    assert ".jsonl" in hint and ".txt" in hint


@pytest.mark.parametrize("name, data, says", [
    ("image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10", "NUL bytes"),  # binary with NUL bytes
    ("latin1.jsonl", b'{"text": "caf\xe9 cr\xe8me"}\n\xff\xfe\xfd', "not UTF-8"),  # no NUL, not UTF-8 either
])
def test_non_text_calibration_file(tiny_bert_dir, tmp_path, name, data, says):
    cal = tmp_path / name
    cal.write_bytes(data)
    out = tmp_path / "out"
    msg, hint = assert_user_error(
        edgeq("export", tiny_bert_dir, "--profile", "android-arm64", "-o", out, "--calibration", cal), out)
    assert str(cal) in msg and says in msg
    assert "UTF-8" in hint


def test_calibration_file_that_overlaps_the_evaluation_split(tiny_bert_dir, tmp_path):
    evaluation = (ROOT / "calibration_data" / "evaluation.jsonl").read_text().splitlines()
    cal = tmp_path / "mine.txt"
    cal.write_text("A sentence of my own about trains.\n" + json.loads(evaluation[5])["text"].upper() + "\n")
    out = tmp_path / "out"
    msg, hint = assert_user_error(
        edgeq("export", tiny_bert_dir, "--profile", "android-arm64", "-o", out, "--calibration", cal), out)
    assert "1 calibration text(s) also appear in the evaluation split" in msg
    assert "remove them" in hint


def test_config_json_that_is_not_an_object(tmp_path):
    model = tmp_path / "listcfg"
    model.mkdir()
    (model / "config.json").write_text("[1, 2]\n")
    (model / "model.safetensors").write_bytes(b"x")
    out = tmp_path / "out"
    msg, hint = assert_user_error(edgeq("export", model, "--profile", "android-arm64", "-o", out), out)
    assert "config.json" in msg


def test_weights_file_that_is_a_git_lfs_pointer(tiny_bert_dir, tmp_path):
    model = Path(shutil.copytree(tiny_bert_dir, tmp_path / "cloned-without-lfs"))
    (model / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:8ebaf8d331d3d1382dacc01576971c8c20599c448599d989d9cd574cd7424ef5\nsize 637128\n")
    out = tmp_path / "out"
    msg, hint = assert_user_error(edgeq("export", model, "--profile", "android-arm64", "-o", out))
    assert "model.safetensors" in msg
    assert not out.exists() or not any(out.iterdir())


def test_output_path_that_is_a_file(tiny_bert_dir, tmp_path):
    out = tmp_path / "build"
    out.write_text("not a folder\n")
    msg, hint = assert_user_error(edgeq("export", tiny_bert_dir, "--profile", "android-arm64", "-o", out))
    assert str(out) in msg
    assert out.read_text() == "not a folder\n"


def test_unsupported_pooling_is_not_silently_replaced_by_mean(tiny_bert_dir, tmp_path):
    model = Path(shutil.copytree(tiny_bert_dir, tmp_path / "tiny-bert-maxpool"))
    (model / "1_Pooling").mkdir()
    (model / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": True, "pooling_mode_mean_sqrt_len_tokens": False}))
    out = tmp_path / "out"
    result = edgeq("export", model, "--profile", "android-arm64", "-o", out, "--samples", 8, "-q")
    if result.exit_code == 0:  # either support max pooling and record it ...
        manifest = json.loads((out / "tiny-bert-maxpool-android-arm64" / "manifest.json").read_text())
        assert manifest["source"]["pooling"] == "max"
    else:  # ... or refuse it as a user-input error that names the pooling
        msg, hint = assert_user_error(result)
        assert "pooling" in msg


@pytest.mark.encoders
def test_output_exists_without_force(tiny_bert_dir, package, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(package, out / PACKAGE_NAME)
    before = snapshot(out)
    msg, hint = assert_user_error(edgeq("export", tiny_bert_dir, "--profile", "android-arm64", "-o", out))
    assert str(out / PACKAGE_NAME) in msg and "already exists" in msg
    assert "--force" in hint
    assert snapshot(out) == before


@pytest.mark.parametrize("name", ["a/b", "../up", "..", ".hidden", "x\\y", "with space", "", "-dash", "a..b",
                                  "é", "x" * 129])
def test_a_name_that_is_not_a_plain_folder_name_is_refused_first(tmp_path, name):
    """--name is checked before anything else (the model folder here does not exist): exit 2, nothing written."""
    out = tmp_path / "out"
    msg, hint = assert_user_error(edgeq("export", tmp_path / "nope", "--profile", "android-arm64", "-o", out,
                                        "--name", name), out)
    assert msg == f"--name {name!r} cannot name a package folder"
    assert "letters, digits, '.', '_' and '-'" in hint and "--name minilm-finetuned-android-arm64" in hint


# ---------------------------------------------------------------------------------------------------- profiles

def profile_block(out: str, name: str) -> str:
    """The lines ``edgeq profiles`` prints for one profile (its name line and the indented ones beneath), joined."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{name} "))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" ")), len(lines))
    return " ".join(" ".join(line.split()) for line in lines[start:end])


def test_profiles_lists_android_arm64():
    result = edgeq("profiles")
    assert result.exit_code == 0, result.output
    block = profile_block(result.stdout, "android-arm64")
    assert block.startswith("android-arm64 Android ARM64 CPU (ONNX Runtime CPU EP, ORT format)")
    assert "models: encoder, causal-lm" in block
    assert "int8 per-channel" in block and "uint8 activations (percentile)" in block
    assert "causal LMs: INT4 gptq block 32 asymmetric, K/V INT8" in block


@pytest.mark.parametrize("args", [("profiles",), ("profiles", "--fields")])
def test_profiles_lines_fit_100_columns(args):
    """They were ~250 wide (issue 17): the target and each model kind's quantization wrap beneath the name."""
    result = edgeq(*args)
    assert result.exit_code == 0, result.output
    assert max(map(len, result.stdout.splitlines())) <= 100


@pytest.mark.parametrize("args", [("profiles", "--fields"), ("profiles",), ("families",), ("profiles", "--names")])
def test_output_into_a_closed_pipe_exits_0_quietly(args):
    """`edgeq profiles --fields | head` exited 1 (click's answer to EPIPE). The reader's end is closed before the
    command starts, so its first write fails whatever the pipe's buffer holds."""
    read, write = os.pipe()
    os.close(read)
    try:
        run = subprocess.run([sys.executable, "-c", "from edgeq.cli import main; main()", *args], stdout=write,
                             stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert (run.returncode, run.stderr) == (0, "")


def test_profiles_names_for_a_gguf_model_takes_gguf_file(tmp_path):
    """Its refusal without --gguf-file tells the user to pass one: profiles takes it now, as export does."""
    from tiny_gguf import tiny_gguf

    tiny_gguf(tmp_path / "m.gguf", "llama", context_length=256)
    msg, hint = assert_user_error(edgeq("profiles", "--names", "--model", tmp_path))
    assert msg == f"{tmp_path} has no config.json" and hint == "it holds m.gguf: pass --gguf-file m.gguf"
    result = edgeq("profiles", "--names", "--model", tmp_path, "--gguf-file", "m.gguf")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["android-arm64"]  # the one supported profile that takes causal LMs
    for args, says in ((("--gguf-file", "m.gguf"), "--gguf-file only goes with --model"),
                       (("--model", tmp_path), "--model only goes with --names")):
        msg, hint = assert_user_error(edgeq("profiles", *args))
        assert msg == says and hint == "see 'edgeq profiles --help'"


def test_set_with_a_typo_key_suggests_the_key(tiny_bert_dir, tmp_path):
    out = tmp_path / "out"
    msg, hint = assert_user_error(edgeq("export", tiny_bert_dir, "--profile", "android-arm64", "-o", out,
                                        "--set", "llm.symetric=true"), out)
    assert msg == "--set llm.symetric: no such profile key" and hint == "did you mean 'llm.symmetric'?"


def test_set_with_a_wrong_value(tiny_bert_dir, tmp_path):
    out = tmp_path / "out"
    msg, hint = assert_user_error(edgeq("export", tiny_bert_dir, "--profile", "android-arm64", "-o", out,
                                        "--set", "llm.block_size=48"), out)
    assert "with --set llm.block_size" in msg and "'llm.block_size' = 48 is not one of 16, 32, 64, 128, 256" in msg
    msg, _ = assert_user_error(edgeq("export", tiny_bert_dir, "--profile", "android-arm64", "-o", out,
                                     "--set", "symmetric"), out)
    assert msg == "--set 'symmetric' is not KEY=VALUE"


def test_profiles_fields_documents_every_key():
    result = edgeq("profiles", "--fields")
    assert result.exit_code == 0, result.output
    out = result.stdout
    m = re.search(r"^quantization\.calibration_method \(default 'percentile'\)\n((    .+\n)+)", out, re.M)
    assert m, out
    assert "minmax" in m.group(1) and "percentile" in m.group(1)  # the doc, wrapped beneath the key
    for key in ("name", "accuracy.min_mean_cosine", "package.zip", "quantization.keep_fp16"):
        assert re.search(rf"^{re.escape(key)}( \(default .*\))?\n    \S", out, re.M), key


# ---------------------------------------------------------------------------------------------------- inspect

@pytest.mark.encoders
def test_inspect_shows_files_precision_and_accuracy(package, manifest):
    result = edgeq("inspect", package)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert re.search(r"^profile\s+android-arm64$", out, re.M)
    for name in manifest["files"]:
        assert re.search(rf"^\s+\d+\.\d\d MB  {re.escape(name)}$", out, re.M), name
    summary = manifest["precision"]["summary"]
    assert {"linear", "embedding", "norm", "attention_mask"} <= set(summary)
    for cat, counts in summary.items():
        line = next(line for line in out.splitlines() if line.strip().startswith(cat + " "))
        for precision, n in counts.items():
            assert f"{precision}: {n}" in line, line
    assert re.search(r"^\s+linear\s+int8: 12$", out, re.M), out
    acc = manifest["accuracy"]
    assert (f"accuracy vs FP32 on 320 held-back texts: mean cosine {acc['mean_cosine']:.5f}, "
            f"min cosine {acc['min_cosine']:.5f}, retrieval top-1 agreement {acc['retrieval_top1']:.3f}") in out
    nnapi = manifest["partitions"]["NNAPI"]
    assert re.search(rf"^NNAPI\s+{re.escape(nnapi['verdict'])}: takes {nnapi['as_is']['supported_nodes']}/"
                     rf"{nnapi['as_is']['nodes']} nodes in {nnapi['as_is']['partitions']} partitions", out, re.M), out


@pytest.mark.encoders
def test_inspect_nodes_gives_every_decision_and_reason(package, manifest):
    result = edgeq("inspect", package, "--nodes")
    assert result.exit_code == 0, result.output
    for d in manifest["precision"]["nodes"]:
        assert f" {d['name']}: {d['reason']}" in result.stdout, d["name"]


def test_inspect_on_a_folder_that_is_not_a_package(tmp_path):
    result = edgeq("inspect", tmp_path)
    error, hint = assert_user_error(result)  # a user mistake: exit 2
    assert re.fullmatch(r".*has no manifest\.json", error) and "edgeq export" in hint


# ---------------------------------------------------------------------------------------------------- verify

@pytest.mark.encoders
def test_verify_passes_and_lists_every_check(package, manifest):
    result = edgeq("verify", package)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for name in manifest["files"]:
        assert any(line.startswith(f"ok   file {name}: sha256 ") for line in lines), name
    assert any(line.startswith("ok   load and run: model.ort on host") for line in lines)
    assert any(line.startswith("ok   outputs match reference: min cosine") for line in lines)
    assert not any(line.startswith("FAIL") for line in lines)
    assert lines[-1] == f"verified {package} on host"


@pytest.mark.encoders
def test_verify_json(package, manifest):
    result = edgeq("verify", package, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.split("\nverified ")[0])
    assert report["ok"] is True
    names = [c[0] for c in report["checks"]]
    assert {f"file {n}" for n in manifest["files"]} <= set(names) and "outputs match reference" in names
    assert all(c[1] for c in report["checks"])


@pytest.mark.encoders
def test_verify_on_a_tampered_copy_fails(package, tmp_path):
    copy = Path(shutil.copytree(package, tmp_path / package.name))
    model = copy / "model.ort"
    data = bytearray(model.read_bytes())
    data[len(data) // 3] ^= 0x01
    model.write_bytes(bytes(data))
    result = edgeq("verify", copy)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert re.search(r"^FAIL file model\.ort: sha256/size differ", result.stdout, re.M), result.stdout
    assert "verified" not in result.stdout
    assert re.search(rf"^error: {re.escape(str(copy))} failed verification$", result.stderr, re.M), result.stderr
    assert re.search(r"^hint: \S", result.stderr, re.M)


@pytest.mark.encoders
def test_verify_on_an_unknown_target_is_refused(package):
    from edgeq.targets import TARGETS

    result = edgeq("verify", package, "--on", "pixel-8")
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    # the choices are the target registry's names
    assert re.search(r"^error: Invalid value for '--on': 'pixel-8' is not one of " + ", ".join(f"'{t}'" for t in TARGETS),
                     result.stderr, re.M), result.stderr
    assert re.search(r"^hint: see 'edgeq verify --help'", result.stderr, re.M)


def test_profiles_lists_every_profile_and_says_which_are_deprecated():
    out = edgeq("profiles").stdout
    for name in ("android-arm64", "ios-arm64", "linux-arm64", "android-nnapi", "android-qnn-htp"):
        assert re.search(rf"^{name} ", out, re.M), name
    assert "DEPRECATED: NNAPI is deprecated since Android 15" in profile_block(out, "android-nnapi")
    assert "DEPRECATED" not in profile_block(out, "android-arm64")


def test_export_with_a_deprecated_profile_says_so_first(tmp_path):
    result = edgeq("export", tmp_path / "nope", "--profile", "android-nnapi", "-o", tmp_path / "out")
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[0].startswith("note: profile 'android-nnapi' is deprecated: NNAPI is deprecated since Android 15")
    assert re.fullmatch(r"\[\s*\d+\.\ds\] check: inputs: .*nope, profile android-nnapi, output .*out", lines[1])
    assert lines[2].startswith("error: model folder")


@pytest.mark.parametrize("args, says", [
    (("export",), "Missing argument 'MODEL_DIR'."),
    (("verify", ".", "--nope"), "No such option '--nope'. (Did you mean one of: '--model', '--on'?)"),
    (("verify", ".", "--model", "."), "--model only go with --rebuild"),
])
def test_click_usage_errors_are_error_and_hint_too(args, says):
    msg, hint = assert_user_error(edgeq(*args))
    assert msg == says and hint == f"see 'edgeq {args[0]} --help'"


def test_help_and_version_still_exit_0():
    for args in (("--help",), ("--version",), ("export", "--help")):
        result = edgeq(*args)
        assert result.exit_code == 0 and result.stdout and not result.stderr, args


def test_set_a_precision_no_pass_implements(tiny_bert_dir, tmp_path):
    """--set quantization.sensitive_precision=fp16 used to export with the 'fp16' layers left FP32 (issue 12)."""
    out = tmp_path / "out"
    msg, hint = assert_user_error(edgeq("export", tiny_bert_dir, "--profile", "android-arm64", "-o", out,
                                        "--set", "quantization.sensitive_precision=fp16"), out)
    assert "'quantization.sensitive_precision' = 'fp16' is not one of int8, int8-weight-only, int8-per-token, w8a16, fp32" in msg
    assert "sensitive_precision" not in hint and "int8-weight-only" in hint
