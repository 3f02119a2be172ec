"""edgeq.stages.package: ORT-format conversion of a small hand-made ONNX model, its growth guard, its byte-stable
layout (edgeq.stages.ort_format), tokenizer copy and the manifest's file table."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import edgeq.stages.ort_format as ort_format
import edgeq.stages.package as package_mod
from edgeq.errors import EdgeqError
from edgeq.manifest import MANIFEST
from edgeq.stages.ort_format import OrtFormatError, canonical_ort
from edgeq.stages.package import MODEL_FILE, OPS_CONFIG, Package, convert_to_ort, copy_tokenizer, finish
from manifest_samples import encoder_manifest
from tiny_models import tiny_onnx_encoder

VOCAB, HIDDEN = 50, 16


def tiny_encoder(path: Path) -> Path:
    return tiny_onnx_encoder(path, seed=0, vocab=VOCAB, hidden=HIDDEN)


def feeds() -> dict[str, np.ndarray]:
    ids = np.array([[2, 10, 11, 12, 3], [2, 20, 3, 0, 0], [2, 49, 1, 7, 3]], np.int64)
    return {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory) -> Path:
    return tiny_encoder(tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="module")
def converted(onnx_model, tmp_path_factory) -> Path:
    """dest folder of one conversion (for the ARM target, as the android-arm64 profile does)."""
    dest = tmp_path_factory.mktemp("pkg-parent") / "pkg"
    out = convert_to_ort(onnx_model, dest, "arm")
    assert out == dest / MODEL_FILE
    return dest


def test_convert_writes_model_ort_and_ops_config_only(converted, onnx_model):
    assert sorted(p.name for p in converted.iterdir()) == sorted([MODEL_FILE, OPS_CONFIG])
    assert sorted(p.name for p in converted.parent.iterdir()) == ["pkg"]  # the staging folder is gone
    assert onnx_model.is_file()  # the source is copied, not moved
    ops = (converted / OPS_CONFIG).read_text()
    for op in ("Gather", "Cast", "Unsqueeze", "MatMul", "Mul"):
        assert re.search(rf"\b{op}\b", ops), op
    assert "ai.onnx;" in ops and '"int64_t"' in ops  # type reduction records the types the kernels need


def test_ort_file_loads_and_matches_the_onnx_model(converted, onnx_model):
    f = feeds()
    (want,) = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"]).run(None, f)
    sess = ort.InferenceSession(str(converted / MODEL_FILE), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in sess.get_outputs()] == ["last_hidden_state"]
    (got,) = sess.run(None, f)
    # Same CPU kernels on the same float32 data, and nothing here for a fusion to reorder: bit-for-bit in practice.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert (got[1, 3:] == 0).all()  # the mask zeroes padding


def test_growth_guard_raises_when_the_ort_file_outgrows_the_onnx(onnx_model, tmp_path, monkeypatch):
    monkeypatch.setattr(package_mod, "MAX_ORT_GROWTH", 0.0)
    monkeypatch.setattr(package_mod, "ORT_FIXED_OVERHEAD", 0)
    dest = tmp_path / "pkg"
    with pytest.raises(EdgeqError) as err:
        convert_to_ort(onnx_model, dest, "arm")
    assert "grew the model" in err.value.message and "stored twice" in err.value.message
    assert err.value.hint
    assert not (dest / MODEL_FILE).exists()


def test_growth_guard_allows_the_real_ratio(converted, onnx_model):
    """The guard's bound holds for a plain conversion: it only fires on real growth."""
    ort_size, onnx_size = (converted / MODEL_FILE).stat().st_size, onnx_model.stat().st_size
    assert ort_size <= package_mod.MAX_ORT_GROWTH * onnx_size + package_mod.ORT_FIXED_OVERHEAD
    assert ort_size > package_mod.MAX_ORT_GROWTH * onnx_size  # here the fixed overhead is what lets it pass


def test_failed_conversion_cleans_up_and_can_be_retried(onnx_model, tmp_path, monkeypatch):
    dest = tmp_path / "pkg"
    monkeypatch.setattr(package_mod, "MAX_ORT_GROWTH", 0.0)
    monkeypatch.setattr(package_mod, "ORT_FIXED_OVERHEAD", 0)
    with pytest.raises(EdgeqError):
        convert_to_ort(onnx_model, dest, "arm")
    monkeypatch.undo()
    assert convert_to_ort(onnx_model, dest, "arm").is_file()  # currently: FileExistsError on the staging folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_copy_tokenizer_copies_only_existing_files(tmp_path):
    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    (src / "tokenizer.json").write_text('{"model": {}}')
    (src / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (src / "merges.txt").mkdir()  # a folder with a tokenizer file's name is not a file
    (src / "unrelated.bin").write_bytes(b"\0")
    copied = copy_tokenizer(src, dest, ("tokenizer.json", "missing.json", "merges.txt", "vocab.txt"))
    assert copied == ["tokenizer.json", "vocab.txt"]  # in the order asked
    assert sorted(p.name for p in dest.iterdir()) == ["tokenizer.json", "vocab.txt"]
    for name in copied:
        assert (dest / name).read_bytes() == (src / name).read_bytes()
    assert (src / "vocab.txt").is_file()  # copied, not moved


def test_finish_writes_a_manifest_whose_files_match_sha256_and_size(converted, tmp_path):
    folder = tmp_path / "package"
    folder.mkdir()
    for name in (MODEL_FILE, OPS_CONFIG):
        (folder / name).write_bytes((converted / name).read_bytes())
    (folder / "vocab.txt").write_text("[PAD]\nhello\n")
    (folder / "extra").mkdir()
    (folder / "extra" / "notes.txt").write_text("nested")
    (folder / MANIFEST).write_text('{"stale": true}')  # an old manifest is replaced, never listed
    manifest = encoder_manifest(extra_key={"kept": True})
    pkg = finish(folder, manifest)
    assert isinstance(pkg, Package) and pkg.path == folder and pkg.model_path == folder / MODEL_FILE
    on_disk = json.loads((folder / MANIFEST).read_text())
    assert on_disk == pkg.manifest
    assert on_disk["model"] == {"file": MODEL_FILE} and "stale" not in on_disk
    assert on_disk["extra_key"] == {"kept": True}  # a key the schema does not name is written as given
    files = on_disk["files"]
    assert sorted(files) == sorted(["extra/notes.txt", MODEL_FILE, OPS_CONFIG, "vocab.txt"])
    for rel, entry in files.items():
        data = (folder / rel).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}, rel
    assert sorted(p.name for p in folder.iterdir()) == sorted(["extra", MANIFEST, MODEL_FILE, OPS_CONFIG, "vocab.txt"])



# ---------------------------------------------------------------------------------------------------- byte-stable

def test_two_conversions_give_the_same_bytes(converted, onnx_model, tmp_path):
    """ONNX Runtime lays the resolver out in a per-process hash order; package.py rewrites it (ort_format.py)."""
    again = tmp_path / "pkg"
    convert_to_ort(onnx_model, again, "arm")
    for name in (MODEL_FILE, OPS_CONFIG):
        assert (again / name).read_bytes() == (converted / name).read_bytes(), name


def test_ops_config_names_the_model_without_a_path(converted):
    assert (converted / OPS_CONFIG).read_text().splitlines()[:2] == ["# Generated from model/s:", "# - model.ort"]


def test_canonical_ort_is_a_fixed_point(converted):
    data = (converted / MODEL_FILE).read_bytes()
    assert bytes(canonical_ort(data)) == data


def test_canonical_ort_depends_on_content_not_layout(converted, monkeypatch):
    """A file with the same content laid out differently (dead bytes before the resolver) is rewritten to the same
    bytes, and ONNX Runtime reads the same model from both."""
    data = (converted / MODEL_FILE).read_bytes()
    write = ort_format._write_resolver

    def with_dead_bytes(builder, resolver):
        builder.CreateString("x" * 37)  # nothing refers to it
        return write(builder, resolver)

    monkeypatch.setattr(ort_format, "_write_resolver", with_dead_bytes)
    other = bytes(canonical_ort(data))
    monkeypatch.undo()
    assert other != data and len(other) > len(data)
    assert bytes(canonical_ort(other)) == data
    f = feeds()
    runs = [ort.InferenceSession(d, providers=["CPUExecutionProvider"]).run(None, f)[0] for d in (data, other)]
    np.testing.assert_array_equal(runs[0], runs[1])


def test_canonical_ort_refuses_a_file_that_is_not_ort_format(onnx_model):
    with pytest.raises(OrtFormatError, match="not an ORT-format file"):
        canonical_ort(onnx_model.read_bytes())


@pytest.mark.parametrize("change, says", [
    (lambda m: m["accuracy"].update(mean_cosine=float("nan")), r"'accuracy.mean_cosine' must be a finite number, got "
                                                               r"float nan"),
    (lambda m: m.pop("recipe"), r"'recipe' must be one of encoder-cpu, encoder-qnn, causal-lm, got missing"),
    (lambda m: m["source"].update(kind="causal-lm"), r"recipe 'encoder-cpu' is for source.kind 'encoder'"),
])
def test_finish_refuses_a_manifest_the_schema_refuses(tmp_path, change, says):
    """What a writer records is what every reader takes: a writer's slip is an edgeq bug at export, not a package
    that no command can read."""
    (tmp_path / "vocab.txt").write_text("a\n")
    manifest = encoder_manifest()
    change(manifest)
    with pytest.raises(EdgeqError, match=r"edgeq wrote a manifest its own schema refuses: .*" + says) as err:
        finish(tmp_path, manifest)
    assert "edgeq bug" in err.value.hint and err.value.exit_code == 1
    assert not (tmp_path / MANIFEST).exists()
