"""edgeq.manifest: tool versions, the per-file hash table, manifest.json write/read with its errors, the structure
check (the typed schema, edgeq/manifest_schema.py, as read_manifest applies it), and package_path (every path a
manifest names stays inside its package)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from importlib import metadata

import pytest

import edgeq
import edgeq.manifest as manifest_mod
from edgeq.errors import PackageError
from edgeq.manifest import (MANIFEST, SCHEMA_VERSION, TOOLS, Manifest, file_entries, package_path, read_manifest,
                            tool_versions, write_manifest)
from manifest_samples import encoder_manifest, llm_manifest

VERSION = re.compile(r"^\d+\.\d+(\.\d+)?([.+-]?\w+)*$")


minimal = encoder_manifest  # the smallest manifest read_manifest takes, for an encoder package


def test_tool_versions_are_the_installed_ones():
    import onnx
    import onnxruntime
    import transformers

    v = tool_versions()
    assert list(v) == list(TOOLS)
    extra = () if v["optimum-onnx"] == "not installed" else ("optimum-onnx",)
    if not extra:  # the encoders extra is optional (absent beside transformers 5), and then said to be
        with pytest.raises(metadata.PackageNotFoundError):
            metadata.version("optimum-onnx")
    for name in ("edgeq", "onnx", "onnxruntime", "transformers", *extra):
        assert v[name] != "not installed", name
        assert VERSION.match(v[name]), (name, v[name])
        assert v[name] == metadata.version(name), name
    # and what the imported modules say about themselves
    assert v["edgeq"] == edgeq.__version__
    assert v["onnx"] == onnx.__version__
    assert v["onnxruntime"] == onnxruntime.__version__
    assert v["transformers"] == transformers.__version__


def test_tool_versions_marks_a_missing_package(monkeypatch):
    monkeypatch.setattr(manifest_mod, "TOOLS", ("onnx", "edgeq-no-such-package"))
    assert tool_versions() == {"onnx": metadata.version("onnx"), "edgeq-no-such-package": "not installed"}


def test_file_entries_hashes_nested_files_and_skips_only_the_top_manifest(tmp_path):
    files = {
        "model.ort": b"\x00\x01model" * 1000,
        "vocab.txt": b"[PAD]\nhello\n",
        "sub/manifest.json": b'{"nested": true}',  # not the package's manifest: listed
        "sub/deeper/weights.bin": b"",
        "manifest.json.bak": b"{}",
    }
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    (tmp_path / MANIFEST).write_text('{"schema_version": 1}')
    (tmp_path / "empty-folder").mkdir()
    entries = file_entries(tmp_path)
    assert sorted(entries) == sorted(files)  # no top-level manifest.json, no folders
    assert list(entries) == sorted(entries)  # stable order
    for rel, data in files.items():
        assert entries[rel] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}, rel


def test_file_entries_of_an_empty_folder(tmp_path):
    assert file_entries(tmp_path) == {}


def test_write_then_read_round_trips(tmp_path):
    manifest = minimal(name="tiny-bert-android-arm64", text="naïve café ✓",
                       nested={"list": [1, 2.5, None, True], "empty": {}})
    path = write_manifest(tmp_path, manifest)
    assert path == tmp_path / MANIFEST
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST]  # no temporary file left
    assert json.loads(path.read_text()) == manifest
    assert isinstance(read_manifest(tmp_path), Manifest)
    assert read_manifest(tmp_path).to_dict() == manifest  # unknown keys are kept, nothing is lost
    assert read_manifest(tmp_path).extra["nested"] == {"list": [1, 2.5, None, True], "empty": {}}
    assert read_manifest(str(tmp_path)).to_dict() == manifest  # a str folder works too


def test_write_replaces_an_existing_manifest(tmp_path):
    write_manifest(tmp_path, minimal(n=1))
    write_manifest(tmp_path, minimal(n=2))
    assert read_manifest(tmp_path).extra["n"] == 2


def test_read_missing_manifest(tmp_path):
    with pytest.raises(PackageError) as err:
        read_manifest(tmp_path)
    assert MANIFEST in err.value.message and str(tmp_path) in err.value.message
    assert "edgeq export" in err.value.hint


def test_read_manifest_that_is_a_folder(tmp_path):
    (tmp_path / MANIFEST).mkdir()
    with pytest.raises(PackageError):
        read_manifest(tmp_path)


@pytest.mark.parametrize("text", ['{"schema_version": 1', "", "not json", '{"a": 1}{"b": 2}'])
def test_read_invalid_json(tmp_path, text):
    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(PackageError) as err:
        read_manifest(tmp_path)
    assert "not valid JSON" in err.value.message
    assert err.value.hint


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, str(SCHEMA_VERSION), None, "missing"])
def test_read_wrong_schema_version(tmp_path, version):
    manifest = {"files": {}} if version == "missing" else {"schema_version": version}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(PackageError) as err:
        read_manifest(tmp_path)
    assert "schema_version" in err.value.message and str(SCHEMA_VERSION) in err.value.message
    assert "re-export" in err.value.hint


@pytest.mark.parametrize("data", [b"[1, 2]", b"1", b'"manifest"', b"null", b"\xff\xfe\x00garbage"])
def test_read_manifest_that_is_not_a_json_object(tmp_path, data):
    (tmp_path / MANIFEST).write_bytes(data)
    with pytest.raises(PackageError) as err:
        read_manifest(tmp_path)
    assert err.value.hint


def test_read_a_folder_that_does_not_exist_or_is_a_file(tmp_path):
    with pytest.raises(PackageError, match=r"package folder .*nope does not exist") as err:
        read_manifest(tmp_path / "nope")
    assert "edgeq export" in err.value.hint and err.value.exit_code == 2
    (tmp_path / "file").write_text("x")
    with pytest.raises(PackageError, match=r"package folder .*file is not a folder"):
        read_manifest(tmp_path / "file")


# ---------------------------------------------------------------------------------------------------- structure

def _drop(m: dict, key: str) -> dict:
    *path, leaf = key.split(".")
    for part in path:
        m = m[part]
    del m[leaf]


@pytest.mark.parametrize("key", ["recipe", "files", "model", "model.file", "profile", "profile.name", "profile.values",
                                 "profile.values.accuracy", "profile.values.accuracy.eval_seq_len",
                                 "source", "source.kind", "source.architecture", "verification",
                                 "verification.inputs", "verification.inputs.attention_mask",
                                 "verification.reference_pooled", "verification.min_cosine",
                                 "verification.max_rel_diff", "verification.pooling", "size", "size.model_bytes",
                                 "size.max_ratio", "precision", "precision.summary", "precision.nodes", "accuracy",
                                 "accuracy.samples", "accuracy.mean_cosine", "accuracy.retrieval_top1"])
def test_a_missing_field_is_named(tmp_path, key):
    manifest = minimal()
    _drop(manifest, key)
    write_manifest(tmp_path, manifest)
    with pytest.raises(PackageError, match=rf"is malformed: '{re.escape(key)}' must be .*, got missing") as err:
        read_manifest(tmp_path)
    assert "re-export" in err.value.hint


@pytest.mark.parametrize("key, value, says", [
    ("files", [], "'files' must be an object, got list []"),
    ("model", "model.ort", "'model' must be an object, got str"),
    ("verification", None, "'verification' must be an object, got NoneType null"),
    ("profile", {"name": 3, "values": {}}, "'profile.name' must be a string, got int 3"),
])
def test_a_field_of_the_wrong_type_is_named(tmp_path, key, value, says):
    write_manifest(tmp_path, minimal(**{key: value}))
    with pytest.raises(PackageError, match=re.escape(says)):
        read_manifest(tmp_path)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), True, "0.9999"])
def test_a_bar_that_is_not_a_finite_number_is_refused(tmp_path, value):
    manifest = minimal()
    manifest["verification"]["min_cosine"] = value
    write_manifest(tmp_path, manifest)
    with pytest.raises(PackageError, match=r"'verification.min_cosine' must be a finite number"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("version", [1, 2])
def test_an_unknown_source_kind_is_refused(tmp_path, version):
    write_manifest(tmp_path, minimal(schema_version=version, source={"kind": "diffusion", "architecture": "X"}))
    with pytest.raises(PackageError, match=r"source.kind 'diffusion' is not one of encoder, causal-lm"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("tokens, says", [
    ([3, "x"], r"'verification.greedy_tokens\[1\]' must be an integer, got str \"x\""),
    ([3, True], r"'verification.greedy_tokens\[1\]' must be an integer, got bool true"),
    ("34", r"'verification.greedy_tokens' must be a list, got str"),
])
def test_an_llm_manifest_needs_its_prompt_and_tokens(tmp_path, tokens, says):
    write_manifest(tmp_path, llm_manifest(verification={"prompt_ids": [1, 2], "greedy_tokens": tokens}))
    with pytest.raises(PackageError, match=says):
        read_manifest(tmp_path)


@pytest.mark.parametrize("key", ["model.genai_config", "profile.values.llm", "profile.values.llm.window_tokens",
                                 "verification.prompt_ids", "accuracy.perplexity", "accuracy.tokens",
                                 "size.max_mb"])
def test_an_llm_manifest_names_its_missing_field(tmp_path, key):
    manifest = llm_manifest()
    _drop(manifest, key)
    write_manifest(tmp_path, manifest)
    with pytest.raises(PackageError, match=rf"is malformed: '{re.escape(key)}' must be .*, got missing"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("entry, says", [
    ({"sha256": "ab"}, r"'files\['model.ort'\].size' must be an integer, got missing"),
    ({"sha256": 1, "size": 2}, r"'files\['model.ort'\].sha256' must be a string, got int 1"),
    ({"sha256": "ab", "size": 2.5}, r"'files\['model.ort'\].size' must be an integer, got float 2.5"),
    ([1, 2], r"'files\['model.ort'\]' must be an object, got list \[1, 2\]"),
])
def test_a_file_entry_without_hash_and_size_is_refused(tmp_path, entry, says):
    write_manifest(tmp_path, minimal(files={"model.ort": entry}))
    with pytest.raises(PackageError, match=says):
        read_manifest(tmp_path)


@pytest.mark.parametrize("where", ["model.file", "model.context_file", "files"])
@pytest.mark.parametrize("name", ["../x.ort", "/etc/passwd", "a/../../x", "./model.ort", "a//b", "a\\b", ""])
def test_paths_in_the_manifest_must_be_plain(tmp_path, where, name):
    manifest = minimal()
    if where == "files":
        manifest["files"] = {name: {"sha256": "0" * 64, "size": 1}}
    else:
        manifest["model"][where.split(".")[1]] = name
    write_manifest(tmp_path, manifest)
    with pytest.raises(PackageError, match=r"is not a plain path inside the package") as err:
        read_manifest(tmp_path)
    assert repr(name) in err.value.message and "re-export" in err.value.hint


# ---------------------------------------------------------------------------------------------------- paths, links

def test_package_path_takes_plain_paths_inside(tmp_path):
    (tmp_path / "sub").mkdir()
    assert package_path(tmp_path, "model.ort") == tmp_path / "model.ort"
    assert package_path(tmp_path, "sub/x.json") == tmp_path / "sub" / "x.json"


@pytest.mark.parametrize("name", ["../x", "/abs/x", "sub/../../x", "..", ".", None, 3])
def test_package_path_refuses_what_leaves_the_folder(tmp_path, name):
    with pytest.raises(PackageError, match="not a plain path inside the package"):
        package_path(tmp_path, name, "model.file")


def test_package_path_refuses_a_symlinked_file_or_parent(tmp_path):
    pkg, outside = tmp_path / "pkg", tmp_path / "outside"
    pkg.mkdir(), outside.mkdir()
    (outside / "model.ort").write_bytes(b"x")
    os.symlink(outside / "model.ort", pkg / "model.ort")
    os.symlink(outside, pkg / "sub")
    with pytest.raises(PackageError, match=r"model.file 'model.ort' goes through the symlink"):
        package_path(pkg, "model.ort", "model.file")
    with pytest.raises(PackageError, match=r"'sub/model.ort' goes through the symlink .*sub$"):
        package_path(pkg, "sub/model.ort")


@pytest.mark.parametrize("target", ["outside", "inside", "folder", "dangling"])
def test_a_symlink_anywhere_in_the_package_is_refused(tmp_path, target):
    pkg = tmp_path / "pkg"
    (pkg / "deep").mkdir(parents=True)
    write_manifest(pkg, minimal())
    (pkg / "vocab.txt").write_text("a\n")
    (tmp_path / "secret").write_text("s")
    source = {"outside": tmp_path / "secret", "inside": pkg / "vocab.txt", "folder": tmp_path,
              "dangling": tmp_path / "nothing"}[target]
    os.symlink(source, pkg / "deep" / "link")
    for call in (read_manifest, file_entries):
        with pytest.raises(PackageError, match=r"holds a symlink, deep/link -> ") as err:
            call(pkg)
        assert "re-export" in err.value.hint


def test_a_symlinked_manifest_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    write_manifest(real, minimal())
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    os.symlink(real / MANIFEST, pkg / MANIFEST)
    with pytest.raises(PackageError, match=rf"holds a symlink, {MANIFEST} -> "):
        read_manifest(pkg)


def test_a_fifo_in_the_package_is_refused_not_read(tmp_path):
    write_manifest(tmp_path, minimal())
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(PackageError, match="holds pipe, which is not a regular file or folder"):
        read_manifest(tmp_path)
    with pytest.raises(PackageError, match="holds pipe"):
        file_entries(tmp_path)
