"""edgeq.manifest: tool versions, the per-file hash table, and manifest.json write/read with its errors."""

from __future__ import annotations

import hashlib
import json
import re
from importlib import metadata

import pytest

import edgeq
import edgeq.manifest as manifest_mod
from edgeq.errors import VerificationError
from edgeq.manifest import MANIFEST, SCHEMA_VERSION, TOOLS, file_entries, read_manifest, tool_versions, write_manifest

VERSION = re.compile(r"^\d+\.\d+(\.\d+)?([.+-]?\w+)*$")


def test_tool_versions_are_the_installed_ones():
    import onnx
    import onnxruntime
    import transformers

    v = tool_versions()
    assert list(v) == list(TOOLS)
    for name in ("edgeq", "onnx", "onnxruntime", "optimum-onnx", "transformers"):
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
    manifest = {"schema_version": SCHEMA_VERSION, "name": "tiny-bert-android-arm64", "text": "naïve café ✓",
                "nested": {"list": [1, 2.5, None, True], "empty": {}}, "files": {}}
    path = write_manifest(tmp_path, manifest)
    assert path == tmp_path / MANIFEST
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST]  # no temporary file left
    assert json.loads(path.read_text()) == manifest
    assert read_manifest(tmp_path) == manifest
    assert read_manifest(str(tmp_path)) == manifest  # a str folder works too


def test_write_replaces_an_existing_manifest(tmp_path):
    write_manifest(tmp_path, {"schema_version": SCHEMA_VERSION, "n": 1})
    write_manifest(tmp_path, {"schema_version": SCHEMA_VERSION, "n": 2})
    assert read_manifest(tmp_path)["n"] == 2


def test_read_missing_manifest(tmp_path):
    with pytest.raises(VerificationError) as err:
        read_manifest(tmp_path)
    assert MANIFEST in err.value.message and str(tmp_path) in err.value.message
    assert "edgeq export" in err.value.hint


def test_read_manifest_that_is_a_folder(tmp_path):
    (tmp_path / MANIFEST).mkdir()
    with pytest.raises(VerificationError):
        read_manifest(tmp_path)


@pytest.mark.parametrize("text", ['{"schema_version": 1', "", "not json", '{"a": 1}{"b": 2}'])
def test_read_invalid_json(tmp_path, text):
    (tmp_path / MANIFEST).write_text(text)
    with pytest.raises(VerificationError) as err:
        read_manifest(tmp_path)
    assert "not valid JSON" in err.value.message
    assert err.value.hint


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, str(SCHEMA_VERSION), None, "missing"])
def test_read_wrong_schema_version(tmp_path, version):
    manifest = {"files": {}} if version == "missing" else {"schema_version": version}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(VerificationError) as err:
        read_manifest(tmp_path)
    assert "schema_version" in err.value.message and str(SCHEMA_VERSION) in err.value.message
    assert "re-export" in err.value.hint


@pytest.mark.parametrize("data", [b"[1, 2]", b"1", b'"manifest"', b"null", b"\xff\xfe\x00garbage"])
def test_read_manifest_that_is_not_a_json_object(tmp_path, data):
    (tmp_path / MANIFEST).write_bytes(data)
    with pytest.raises(VerificationError) as err:
        read_manifest(tmp_path)
    assert err.value.hint
