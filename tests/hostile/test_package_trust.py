"""Issue 13, item 3: ``verify``, ``inspect``, ``run``, ``eval`` and ``report`` treat a package as untrusted, and a
profile name can never be a path.

One tiny BERT package is exported per module (android-arm64, as tests/test_pipeline.py does); each test tampers with
a copy. A user mistake or a package edgeq refuses to read exits 2 with ``error:``/``hint:``; a package that reads but
fails a check exits 1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from edgeq.cli import main
from edgeq.errors import PackageError
from edgeq.pipeline import ExportRequest, export_package
from profile_edits import edited_profile

SAMPLES = 32
PACKAGE_NAME = "tiny-bert-android-arm64"


def edgeq(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(result, message: str) -> str:
    """Exit 2, the ``error:`` line matching ``message`` (a regex), a ``hint:``, no traceback; returns the error."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    errors = re.findall(r"^error: (.*)$", result.stderr, re.M)
    assert len(errors) == 1 and re.search(message, errors[0]), result.stderr
    assert re.search(r"^hint: \S", result.stderr, re.M), result.stderr
    return errors[0]


def failed_verification(result) -> list[str]:
    """Exit 1 with the FAIL lines printed and the failed-verification error; returns the FAIL lines."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and "verified" not in result.stdout
    assert re.search(r"^error: .* failed verification$", result.stderr, re.M), result.stderr
    return [line for line in result.stdout.splitlines() if line.startswith("FAIL")]


@pytest.fixture(scope="module")
def package(tiny_bert_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trust-out")
    return export_package(ExportRequest(tiny_bert_dir, "android-arm64", out_dir=out, samples=SAMPLES)).path


@pytest.fixture
def copy(package, tmp_path) -> Path:
    return Path(shutil.copytree(package, tmp_path / PACKAGE_NAME, symlinks=True))


def edit(folder: Path, change) -> dict:
    """Tamper the manifest, as an attacker would, and drop the package's zip (which holds the original manifest and
    would fail check_zip on its own: tests/hostile/test_staging.py covers that check)."""
    for z in folder.glob("*.zip"):
        z.unlink()
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return manifest


@pytest.mark.encoders
def test_the_untouched_copy_verifies(copy):
    result = edgeq("verify", copy)
    assert result.exit_code == 0, result.output
    assert re.search(r"^ok   thresholds: min_cosine 0\.9999, max_rel_diff 0\.01, device_min_cosine 0\.999, "
                     r"device_max_rel_diff 0\.05 \(at least as strict as profile 'android-arm64'\)$",
                     result.stdout, re.M), result.stdout


# ---------------------------------------------------------------------------------------------------- paths

@pytest.mark.parametrize("how", ["dotdot", "absolute"])
@pytest.mark.encoders
def test_model_file_outside_the_package_is_refused(copy, tmp_path, how):
    """A real, working model beside the package: it used to run and print 'verified'."""
    outside = tmp_path / "x.ort"
    shutil.copy(copy / "model.ort", outside)
    name = "../x.ort" if how == "dotdot" else str(outside)
    edit(copy, lambda m: m["model"].update(file=name))
    for command in (("verify", copy), ("inspect", copy), ("report", copy, "--no-speed", "--no-plots", "-o",
                                                         tmp_path / "report")):
        error = refused(edgeq(*command), r"model\.file .* is not a plain path inside the package")
        assert repr(name) in error, command
    assert not (tmp_path / "report").exists()


@pytest.mark.encoders
def test_a_file_listed_outside_the_package_is_refused(copy):
    edit(copy, lambda m: m["files"].update({"../secret": {"sha256": "0" * 64, "size": 1}}))
    refused(edgeq("verify", copy), r"file '\.\./secret' is not a plain path inside the package")


@pytest.mark.parametrize("target", ["outside", "inside"])
@pytest.mark.encoders
def test_a_symlink_in_the_package_is_refused(copy, tmp_path, target):
    """The outside link has the same bytes as the file it replaces, so every hash still matched."""
    if target == "outside":
        shutil.move(copy / "vocab.txt", tmp_path / "vocab.txt")
        os.symlink(tmp_path / "vocab.txt", copy / "vocab.txt")
    else:
        os.rename(copy / "model.ort", copy / "model-real.ort")
        os.symlink("model-real.ort", copy / "model.ort")
    name = "vocab.txt" if target == "outside" else "model.ort"
    for command in ("verify", "inspect"):
        refused(edgeq(command, copy), rf"holds a symlink, {re.escape(name)} -> ")


@pytest.mark.encoders
def test_a_symlinked_folder_in_the_package_is_refused(copy, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", copy / "sub")
    refused(edgeq("verify", copy), r"holds a symlink, sub -> ")


# ---------------------------------------------------------------------------------------------------- thresholds

@pytest.mark.parametrize("key, value, says", [
    ("min_cosine", -1, r"verification\.min_cosine = -1 in the manifest is looser than 0\.9999 "
                       r"\(package\.verify_min_cosine of profile 'android-arm64'\)"),
    ("device_min_cosine", 0, r"verification\.device_min_cosine = 0 in the manifest is looser than 0\.999 "
                             r"\(package\.device_min_cosine of profile 'android-arm64'\)"),
])
@pytest.mark.encoders
def test_a_loosened_bar_fails_verification(copy, key, value, says):
    edit(copy, lambda m: m["verification"].update({key: value}))
    fails = failed_verification(edgeq("verify", copy))
    assert len(fails) == 1 and re.fullmatch(rf"FAIL thresholds: {says}", fails[0]), fails


@pytest.mark.encoders
def test_a_loosened_bar_does_not_hide_moved_outputs(copy):
    def loosen_and_move(m):
        v = m["verification"]
        v.update(min_cosine=-1, max_rel_diff=100)
        v["reference_pooled"] = [[-x for x in row] for row in v["reference_pooled"]]

    edit(copy, loosen_and_move)
    fails = failed_verification(edgeq("verify", copy))
    assert [f.split(":")[0] for f in fails] == ["FAIL thresholds", "FAIL outputs match reference"], fails
    assert "(need >= 0.9999 on every sample)" in fails[1] and "(need <= 0.01)" in fails[1]


@pytest.mark.encoders
def test_a_manifest_naming_an_unknown_profile_is_refused(copy):
    def rename(m):
        m["profile"]["name"] = "pixel-99"
        del m["profile"]["file"]

    edit(copy, rename)
    result = edgeq("verify", copy)
    refused(result, r"the package names an unknown profile 'pixel-99'")
    assert re.search(r"^hint: known profiles: .*android-arm64", result.stderr, re.M)


# ---------------------------------------------------------------------------------------------------- malformed

def _drop_verification(m):
    del m["verification"]


def _files_as_list(m):
    m["files"] = list(m["files"])


def _drop_model(m):
    del m["model"]


MALFORMED = {
    "no verification": (_drop_verification, r"is malformed: 'verification' must be an object, got missing"),
    "files a list": (_files_as_list, r"is malformed: 'files' must be an object, got list \["),
    "no model": (_drop_model, r"is malformed: 'model' must be an object, got missing"),
    "invalid JSON": (None, r"manifest\.json is not valid JSON: "),
}


@pytest.mark.parametrize("case", MALFORMED)
@pytest.mark.parametrize("command", ["verify", "inspect", "report", "run", "eval"])
@pytest.mark.encoders
def test_a_malformed_manifest_is_a_clear_error(copy, tmp_path, case, command):
    change, says = MALFORMED[case]
    if change is None:
        (copy / "manifest.json").write_text('{"schema_version": 1, "files": {')
    else:
        edit(copy, change)
    args = {"verify": (), "inspect": (), "report": ("--no-speed", "--no-plots", "-o", tmp_path / "report"),
            "run": ("--prompt", "hi"), "eval": ("--text", tmp_path / "text.txt")}[command]
    result = edgeq(command, copy, *args)
    assert str(copy) in refused(result, says)
    assert re.search(r"^hint: re-export the package", result.stderr, re.M)


@pytest.mark.parametrize("command", ["inspect", "verify"])
@pytest.mark.encoders
def test_a_malformed_detail_inspect_shows_is_a_clear_error(copy, command):
    """Typed when read (not when shown): every command refuses it by name, and nothing is half printed."""
    edit(copy, lambda m: m.update(partitions={"NNAPI": {"verdict": "ok"}}))
    result = edgeq(command, copy)
    refused(result, r"manifest\.json is malformed: 'partitions\.NNAPI\.as_is' must be an object, got missing$")
    assert result.stdout == ""


@pytest.mark.parametrize("where", ["missing", "file"])
def test_a_path_that_is_not_a_package_exits_2(tmp_path, where):
    path = tmp_path / "nothing"
    if where == "file":
        path.write_text("not a folder")
    for command in ("verify", "inspect"):
        refused(edgeq(command, path), r"package folder .*nothing (does not exist|is not a folder)")
    refused(edgeq("inspect", tmp_path), r"has no manifest\.json$")


@pytest.mark.encoders
def test_run_on_an_encoder_package_exits_2(copy):
    refused(edgeq("run", copy, "--prompt", "hi"), r"is not an LLM package")


# ---------------------------------------------------------------------------------------------------- genai, QNN

def genai_folder(tmp_path: Path, **decoder) -> Path:
    folder = tmp_path / "genai"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"never loaded")
    config = {"model": {"context_length": 64, "decoder": {"filename": "model.onnx",
                                                          "session_options": {"log_id": "x", "provider_options": []},
                                                          **decoder}}}
    (folder / "genai_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("decoder, says", [
    ({"filename": "../model.onnx"}, r"genai_config\.json filename '\.\./model\.onnx' is not a plain path"),
    ({"filename": "/tmp/model.onnx"}, r"genai_config\.json filename '/tmp/model\.onnx' is not a plain path"),
    ({"filename": "gone.onnx"}, r"names the model file 'gone\.onnx', which the package does not hold"),
    ({"session_options": {"custom_ops_library": "/tmp/evil.so"}}, r"session_options custom_ops_library is not one "
                                                                  r"edgeq writes"),
    ({"session_options": {"provider_options": [{"qnn": {"backend_path": "/tmp/evil.so"}}]}},
     r"session_options provider_options is not one edgeq writes"),
])
def test_a_genai_config_that_names_files_or_libraries_is_refused(tmp_path, decoder, says):
    """onnxruntime-genai would load what genai_config.json names: a model outside or a shared library."""
    from edgeq.llm.genai import check_genai_config, generate

    folder = genai_folder(tmp_path, **decoder)
    with pytest.raises(PackageError, match=says):
        check_genai_config(folder)
    with pytest.raises(PackageError, match=says):  # before onnxruntime-genai sees the folder
        list(generate(folder, "hi", 4))


def test_the_genai_config_edgeq_writes_passes(tmp_path):
    from edgeq.llm.genai import check_genai_config

    assert check_genai_config(genai_folder(tmp_path))["model"]["context_length"] == 64


@pytest.mark.parametrize("mode, ok", [(1, True), (0, False)])
def test_an_epcontext_model_must_embed_its_context_binary(tmp_path, mode, ok):
    from edgeq.devices.qnn_htp import check_embedded_context

    node = helper.make_node("EPContext", ["x"], ["y"], domain="com.microsoft", embed_mode=mode,
                            ep_cache_context="../../elsewhere/ctx.bin" if mode == 0 else "binary")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "model_ctx.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("com.microsoft", 1)]), str(path))
    if ok:
        check_embedded_context(path)
    else:
        with pytest.raises(PackageError, match=r"EPContext node .* has embed_mode 0"):
            check_embedded_context(path)


# ---------------------------------------------------------------------------------------------------- profile name

@pytest.mark.parametrize("how", ["toml", "set"])
def test_a_profile_name_that_is_a_path_never_touches_a_folder_outside_out(tiny_bert_dir, tmp_path, how):
    """name = 'x/../../victim' made OUT/<model>-x/../../victim, i.e. a folder beside OUT, which export --force
    deleted. Now the name is refused before anything is written."""
    out, victim = tmp_path / "out", tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    out.mkdir()
    (out / "other.txt").write_text("also mine")
    if how == "toml":
        profile = edited_profile(tmp_path, r'^name = .*$', 'name = "x/../../victim"', "evil.toml")
        args = ("--profile", profile)
    else:
        args = ("--profile", "android-arm64", "--set", "name=x/../../victim")
    result = edgeq("export", tiny_bert_dir, *args, "-o", out, "--force", "--samples", 8, "-q")
    refused(result, r"name 'x/\.\./\.\./victim' is not a plain name")
    assert re.search(r"^hint: use only letters, digits, '\.', '_' and '-'", result.stderr, re.M)
    assert (victim / "keep.txt").read_text() == "mine" and sorted(p.name for p in victim.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in out.iterdir()) == ["other.txt"]


@pytest.mark.parametrize("name", [".hidden", "a..b", "a b", "é", "-x", "x" * 129])
def test_profile_names_are_plain_file_names(name, tmp_path):
    from edgeq.errors import ProfileError
    from edgeq.profiles import load_profile

    plain = bool(re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}", name)) and ".." not in name
    if plain:
        assert load_profile("android-arm64", overrides={"name": name}).name == name
    else:
        with pytest.raises(ProfileError, match="is not a plain name"):
            load_profile("android-arm64", overrides={"name": name})


def test_a_model_folder_whose_name_is_hidden_is_refused(tiny_bert_dir, tmp_path):
    hidden = Path(shutil.copytree(tiny_bert_dir, tmp_path / ".edgeq-model"))
    result = edgeq("export", hidden, "--profile", "android-arm64", "-o", tmp_path / "out", "-q")
    refused(result, r"the model name '\.edgeq-model' cannot name a package folder")
    assert not (tmp_path / "out").exists()


def test_a_dest_that_is_a_symlink_out_of_out_is_refused(tiny_bert_dir, tmp_path):
    out, victim = tmp_path / "out", tmp_path / "victim"
    out.mkdir(), victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    os.symlink(victim, out / "tiny-bert-android-arm64")
    result = edgeq("export", tiny_bert_dir, "--profile", "android-arm64", "-o", out, "--force", "-q")
    refused(result, r"does not resolve to a folder directly inside")
    assert (victim / "keep.txt").read_text() == "mine"

