"""GGUF sources are checked from their own metadata before anything is dequantized."""

import pytest
from tiny_gguf import tiny_gguf as write_gguf

from edgeq.errors import ModelFolderError, UnsupportedModelError
from edgeq.modelsource import inspect_model_dir, read_gguf_info


def test_reads_architecture_and_name(tmp_path):
    info = read_gguf_info(write_gguf(tmp_path / "m.gguf", "llama", context_length=256))
    assert (info.architecture, info.name, info.file_type, info.context_length) == ("llama", "tiny llama", 0, 256)


def test_llama_gguf_is_a_causal_lm_source(tmp_path):
    write_gguf(tmp_path / "m.gguf", "llama")
    src = inspect_model_dir(tmp_path, gguf_file="m.gguf")
    assert (src.kind, src.task, src.gguf_file, src.weight_files) == ("causal-lm", "text-generation-with-past", "m.gguf",
                                                                     ("m.gguf",))
    assert list(src.file_hashes) == ["m.gguf"]


def test_gguf_that_is_not_a_causal_lm_is_refused(tmp_path):
    write_gguf(tmp_path / "enc.gguf", "bert")
    with pytest.raises(UnsupportedModelError, match="'bert' model, which is not a causal LM family edgeq exports") as err:
        inspect_model_dir(tmp_path, gguf_file="enc.gguf")
    assert "llama" in err.value.hint


def test_missing_and_non_gguf_files(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        inspect_model_dir(tmp_path, gguf_file="absent.gguf")
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelFolderError, match="not a readable GGUF file"):
        inspect_model_dir(tmp_path, gguf_file="fake.gguf")


def test_folder_with_only_a_gguf_suggests_the_flag(tmp_path):
    write_gguf(tmp_path / "m.gguf", "llama")
    with pytest.raises(ModelFolderError, match="has no config.json") as err:
        inspect_model_dir(tmp_path)
    assert "--gguf-file m.gguf" in err.value.hint
