"""edgeq.stages.export: the tiny BERT through optimum-onnx's exporter, checked against transformers in torch (tests
marked ``encoders``: skipped where the extra is not installed); and, with optimum made unimportable in a subprocess,
the error an encoder export gives without it while the rest of the CLI works."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cli_results import edgeq_without_optimum

from edgeq.errors import ModelFolderError
from edgeq.modelsource import inspect_model_dir
from edgeq.runtime import session
from edgeq.stages.export import ExportedModel, export

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
HIDDEN = 64
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "How do I replace the inner tube on a bike?",
    "ok",
    "Prices rose 3.5% in March, the fastest pace in a year, as energy and food costs climbed again. " * 4,
]
# Measured: max |ORT - torch| over every position of SENTENCES (padded, the last one truncated at 128 tokens) is
# 9.5e-7 with max |hidden| 3.57, i.e. one float32 ulp at that magnitude (4.8e-7) times two: the two runtimes sum
# in different orders. 1e-5 leaves 10x margin and is still 1000x below what a wrong weight, a dropped LayerNorm or
# a mishandled mask would give (differences of order 0.01-1).
TORCH_ATOL = 1e-5


@pytest.fixture(scope="module")
def source(tiny_bert_dir):
    return inspect_model_dir(tiny_bert_dir)


@pytest.fixture(scope="module")
def exported(source, tmp_path_factory) -> ExportedModel:
    return export(source, tmp_path_factory.mktemp("export-work"))


@pytest.fixture(scope="module")
def model(exported) -> onnx.ModelProto:
    return onnx.load(str(exported.onnx_path))


@pytest.mark.encoders
def test_export_writes_a_valid_model_onnx(exported, source, model):
    assert exported.onnx_path.name == "model.onnx" and exported.onnx_path.is_file()
    assert exported.source == source
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.encoders
def test_inputs_and_output_names_and_types(exported, model):
    assert exported.input_names == INPUTS
    assert exported.output_names == ("last_hidden_state",)
    for i in model.graph.input:
        t = i.type.tensor_type
        assert t.elem_type == onnx.TensorProto.INT64, i.name
        assert [d.dim_param for d in t.shape.dim] == ["batch_size", "sequence_length"], i.name  # both dynamic
    (out,) = model.graph.output
    dims = out.type.tensor_type.shape.dim
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param for d in dims[:2]] == ["batch_size", "sequence_length"] and dims[2].dim_value == HIDDEN


@pytest.mark.encoders
def test_tokenizer_files_beside_the_model(exported, source, tiny_bert_dir):
    assert exported.tokenizer_dir == exported.onnx_path.parent
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "config.json"):
        assert (exported.tokenizer_dir / name).is_file(), name
    assert (exported.tokenizer_dir / "vocab.txt").read_bytes() == (tiny_bert_dir / "vocab.txt").read_bytes()


@pytest.mark.encoders
def test_exported_tokenizer_tokenizes_like_the_source(exported, tiny_bert_dir):
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(str(exported.tokenizer_dir), local_files_only=True)
    theirs = AutoTokenizer.from_pretrained(str(tiny_bert_dir), local_files_only=True)
    a = ours(SENTENCES, padding=True, truncation=True, max_length=128)
    b = theirs(SENTENCES, padding=True, truncation=True, max_length=128)
    assert dict(a) == dict(b)


@pytest.mark.encoders
def test_outputs_match_transformers_in_torch(exported, tiny_bert_dir):
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert_dir), local_files_only=True)
    torch_model = AutoModel.from_pretrained(str(tiny_bert_dir), local_files_only=True).eval()
    enc = tokenizer(SENTENCES, padding=True, truncation=True, max_length=128, return_tensors="pt")
    assert enc["input_ids"].shape[1] == 128 and not enc["attention_mask"].bool().all()  # truncation and padding
    with torch.no_grad():
        expected = torch_model(**enc).last_hidden_state.numpy()
    feeds = {k: v.numpy().astype(np.int64) for k, v in enc.items()}
    assert set(feeds) == set(INPUTS)
    # No ORT graph optimizations: this checks the exported graph, not ORT's rewrites of it.
    (got,) = session(exported.onnx_path, optimization=ort.GraphOptimizationLevel.ORT_DISABLE_ALL).run(None, feeds)
    assert got.shape == expected.shape == (len(SENTENCES), 128, HIDDEN)
    np.testing.assert_allclose(got, expected, rtol=0, atol=TORCH_ATOL)


@pytest.mark.encoders
def test_export_leaves_the_source_folder_untouched(source, tiny_bert_dir, exported):
    from edgeq.modelsource import sha256_file

    for rel, digest in source.file_hashes.items():
        assert sha256_file(tiny_bert_dir / rel) == digest, rel
    assert not (tiny_bert_dir / "model.onnx").exists()


@pytest.mark.encoders
def test_truncated_weights_are_a_model_folder_error(tiny_bert_dir, tmp_path):
    """A download cut off after the header: the header parses, but describes more tensor bytes than the file holds;
    inspect_model_dir() refuses it before any export work starts."""
    folder = tmp_path / "truncated"
    shutil.copytree(tiny_bert_dir, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    header = int.from_bytes(data[:8], "little")
    weights.write_bytes(data[: 8 + header + 100])
    with pytest.raises(ModelFolderError, match="truncated") as err:
        inspect_model_dir(folder)
    assert err.value.hint


def test_an_encoder_export_without_optimum_names_the_extra_before_any_work(tiny_bert_dir, tmp_path):
    out = tmp_path / "out"
    run = edgeq_without_optimum("export", str(tiny_bert_dir), "--profile", "android-arm64", "-o", str(out))
    assert run.returncode == 2, run.stderr
    error, hint = run.stderr.strip().splitlines()[-2:]
    assert error.startswith("error: exporting bert models needs optimum-onnx, edgeq's 'encoders' extra, and it "
                            "does not import"), error
    assert hint.startswith("hint: pip install 'edgeq[encoders]': optimum-onnx 0.1.0 needs transformers < 4.58 "
                           "(this environment has transformers "), hint
    assert not out.exists()  # refused in the input checks: nothing staged, nothing written


def test_without_optimum_the_cli_lists_families_and_profiles():
    for args, expect in ((("families",), "llama"), (("profiles", "--names"), "android-arm64")):
        run = edgeq_without_optimum(*args)
        assert run.returncode == 0 and expect in run.stdout, run.stderr
