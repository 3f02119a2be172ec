"""GGUF sources are checked from their own metadata before anything is dequantized."""

import numpy as np
import pytest

from edgeq.errors import ModelFolderError, UnsupportedModelError
from edgeq.llm.gguf_source import read_gguf_info
from edgeq.modelsource import inspect_model_dir


def write_gguf(path, arch: str):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    w.add_file_type(0)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_reads_architecture_and_name(tmp_path):
    info = read_gguf_info(write_gguf(tmp_path / "m.gguf", "llama"))
    assert (info.architecture, info.name, info.file_type) == ("llama", "tiny llama", 0)


def test_llama_gguf_is_a_causal_lm_source(tmp_path):
    write_gguf(tmp_path / "m.gguf", "llama")
    src = inspect_model_dir(tmp_path, gguf_file="m.gguf")
    assert (src.kind, src.task, src.gguf_file, src.weight_files) == ("causal-lm", "text-generation-with-past", "m.gguf",
                                                                     ("m.gguf",))
    assert list(src.file_hashes) == ["m.gguf"]


def test_gguf_that_is_not_a_causal_lm_is_refused(tmp_path):
    write_gguf(tmp_path / "enc.gguf", "bert")
    with pytest.raises(UnsupportedModelError, match="'bert' model, not a decoder-only causal LM") as err:
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
