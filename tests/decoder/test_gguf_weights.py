"""GgufTensors and gguf_folder against transformers' own GGUF loader (materialize_gguf: from_pretrained(gguf_file=))
on tiny GGUFs written from tiny random checkpoints the way llama.cpp writes them, and on the real SmolLM2 (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from llm.tiny_families import tiny_family
from llm.tiny_llama import BOS_ID, EOS_ID
from safetensors.numpy import load_file
from tiny_gguf import tiny_gguf

from edgeq.decoder.gguf_weights import GgufTensors, gguf_folder
from edgeq.decoder.weights import TensorSource
from edgeq.errors import ModelFolderError, UnsupportedModelError
from edgeq.llm.gguf_source import materialize_gguf

from .gguf_files import write_gguf

TEXTS = ["Hello world", "The capital of France is Paris.", "<|im_start|>user\nhi<|im_end|>\n", " leading  spaces\n"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {family: tiny_family(family, root / family) for family in ("llama", "mistral", "qwen2", "phi3")}


def gguf_of(checkpoints, tmp_path: Path, family: str, qtype: str, **kw) -> Path:
    """llama.cpp writes a Mistral checkpoint with the llama architecture (and its Q/K permutation)."""
    (tmp_path / "g").mkdir(exist_ok=True)
    return write_gguf(checkpoints[family], tmp_path / "g" / "m.gguf", qtype,
                      arch="llama" if family == "mistral" else None, **kw)


@pytest.mark.parametrize("family,qtype", [("llama", "F32"), ("llama", "Q8_0"), ("llama", "Q4_0"),
                                          ("mistral", "Q4_0"), ("qwen2", "Q8_0"), ("phi3", "Q4_0")])
def test_folder_and_tensors_equal_transformers_loader(checkpoints, tmp_path, family, qtype):
    path = gguf_of(checkpoints, tmp_path, family, qtype)
    out, source = gguf_folder(path, tmp_path / "ours")
    ref_dir = materialize_gguf(path.parent, path.name, tmp_path / "transformers")
    ref = load_file(str(ref_dir / "model.safetensors"))
    assert isinstance(source, TensorSource)
    assert source.keys() == sorted(ref)
    for name in ref:
        # Both dequantize with gguf.quants.dequantize and un-permute Q/K the same way: bit-identical (measured).
        w = source.get(name)
        assert w.dtype == np.float32 and w.shape == ref[name].shape == source.shape(name), name
        np.testing.assert_array_equal(w, ref[name], err_msg=name)
    assert json.loads((out / "config.json").read_text()) == json.loads((ref_dir / "config.json").read_text())
    for file in TOKENIZER_FILES:  # transformers 5 writes no special_tokens_map.json
        assert (out / file).is_file() == (ref_dir / file).is_file(), file
        assert not (out / file).is_file() or (out / file).read_text() == (ref_dir / file).read_text(), file
    assert not list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "phi3"])
def test_tensors_are_the_checkpoints(checkpoints, tmp_path, family):
    """Independent of transformers: F32 gives the checkpoint back exactly (llama.cpp's Q/K permutation undone),
    Q8_0 within its rounding: half a step d = block max / 127 (blocks of 32 along the rows), plus d's own rounding
    to float16 (relative 2^-11) times |q| <= 127."""
    original = load_file(str(checkpoints[family] / "model.safetensors"))
    for qtype in ("F32", "Q8_0"):
        source = GgufTensors(gguf_of(checkpoints, tmp_path, family, qtype))
        assert source.keys() == sorted(original)
        for name, want in original.items():
            got = source.get(name)
            if qtype == "F32" or want.ndim == 1:
                np.testing.assert_array_equal(got, want, err_msg=name)
            else:
                blocks = np.abs(want).reshape(want.shape[0], -1, 32).max(axis=2, keepdims=True)
                error = np.abs(got - want).reshape(blocks.shape[0], -1, 32)
                assert (error <= blocks / 127 * (0.5 + 127 * 2.0**-11)).all(), name


def test_dequantizing_in_row_slices_changes_nothing(checkpoints, tmp_path, monkeypatch):
    """Slices of 7 rows of 64 (600 = 85 x 7 + 5 embedding rows) give the tensors dequantized whole."""
    from edgeq.decoder import gguf_weights

    source = GgufTensors(gguf_of(checkpoints, tmp_path, "llama", "Q4_0"))
    whole = {name: source.get(name) for name in source.keys()}
    monkeypatch.setattr(gguf_weights, "SLICE_VALUES", 7 * 64)
    for name, want in whole.items():
        np.testing.assert_array_equal(source.get(name), want, err_msg=name)


@pytest.mark.parametrize("add_bos", [False, True])
def test_tokenizer_follows_the_gguf(checkpoints, tmp_path, add_bos):
    from transformers import AutoTokenizer

    path = gguf_of(checkpoints, tmp_path, "llama", "Q8_0", add_bos=add_bos)
    out, _ = gguf_folder(path, tmp_path / "ours")
    ours = AutoTokenizer.from_pretrained(str(out))
    theirs = AutoTokenizer.from_pretrained(str(materialize_gguf(path.parent, path.name, tmp_path / "transformers")))
    original = AutoTokenizer.from_pretrained(str(checkpoints["llama"]))  # puts BOS in front of every text
    for text in TEXTS:
        ids = ours(text).input_ids
        assert ids == theirs(text).input_ids
        assert ids == ([BOS_ID] if add_bos else []) + original(text).input_ids[1:]
    assert ours.eos_token_id == EOS_ID


def test_refuses_a_missing_tensor(checkpoints, tmp_path):
    path = gguf_of(checkpoints, tmp_path, "llama", "F32", skip=("model.layers.1.mlp.down_proj.weight",))
    with pytest.raises(ModelFolderError, match=r"1 missing: model\.layers\.1\.mlp\.down_proj\.weight") as err:
        gguf_folder(path, tmp_path / "out")
    assert err.value.exit_code == 2 and "re-convert" in err.value.hint
    assert not (tmp_path / "out").exists()


def test_refuses_scaled_rotary_frequencies(checkpoints, tmp_path):
    """transformers' GGUF config keeps no rope scaling: a Llama-3.x GGUF would be built with plain RoPE, and its
    FP32 reference too, so no gate would notice. Refused, with the checkpoint to use instead."""
    path = gguf_of(checkpoints, tmp_path, "llama", "F32", rope_freqs=True)
    with pytest.raises(UnsupportedModelError, match=r"scales its rotary frequencies \(rope_freqs\.weight") as err:
        gguf_folder(path, tmp_path / "out")
    assert err.value.exit_code == 2 and "safetensors" in err.value.hint
    assert not (tmp_path / "out").exists()


def test_refuses_a_type_gguf_cannot_dequantize(checkpoints, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    source = GgufTensors(gguf_of(checkpoints, tmp_path, "llama", "Q8_0", f64=(name,)))
    with pytest.raises(UnsupportedModelError, match=r"tensor blk\.0\.ffn_up\.weight is stored as F64, which the gguf"):
        source.get(name)


def test_refuses_tensors_the_architecture_lacks(checkpoints, tmp_path):
    """Qwen2's q/k/v biases under the llama architecture: transformers would drop them silently."""
    path = write_gguf(checkpoints["qwen2"], tmp_path / "m.gguf", "F32", arch="llama")
    with pytest.raises(ModelFolderError, match=r"6 not of the architecture: blk\.0\.attn_k\.bias, blk\.0\.attn_q"):
        GgufTensors(path)


@pytest.mark.parametrize("arch", ["gemma2", "mistral"])  # transformers 4.57 + gguf 0.19 cannot load 'mistral'
def test_refuses_an_architecture_it_does_not_read(tmp_path, arch):
    with pytest.raises(UnsupportedModelError, match=f"'{arch}' model, which edgeq does not read tensor by tensor") \
            as err:
        GgufTensors(tiny_gguf(tmp_path / "g.gguf", arch))
    assert err.value.exit_code == 2 and "writes Mistral checkpoints as 'llama'" in err.value.hint


def test_refuses_an_architecture_edgeq_refuses(tmp_path):
    with pytest.raises(UnsupportedModelError, match="holds a 'bert' model, which is not a causal LM family"):
        gguf_folder(tiny_gguf(tmp_path / "b.gguf", "bert"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_name_is_a_key_error(checkpoints, tmp_path):
    source = GgufTensors(gguf_of(checkpoints, tmp_path, "qwen2", "F32"))
    with pytest.raises(KeyError, match="holds no tensor 'lm_head.weight'"):  # tied: the GGUF has no output.weight
        source.get("lm_head.weight")


# ---- the real SmolLM2-135M-Instruct Q4_1 GGUF --------------------------------------------------------------------

READ_ALL = """
import sys
from edgeq.decoder.gguf_weights import GgufTensors
source = GgufTensors(sys.argv[1])
print(sum(source.get(name).size for name in source.keys()))
"""
FOLDER = """
import sys
from pathlib import Path
from edgeq.decoder.gguf_weights import gguf_folder
gguf_folder(Path(sys.argv[1]), Path(sys.argv[2]))
"""
MATERIALIZE = """
import sys
from pathlib import Path
from edgeq.llm.gguf_source import materialize_gguf
materialize_gguf(Path(sys.argv[1]).parent, Path(sys.argv[1]).name, Path(sys.argv[2]))
"""


def peak_rss_mib(script: str, *args: str) -> float:
    """Maximum resident set size of a fresh Python running ``script`` (GNU time -v)."""
    done = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", script, *args], capture_output=True,
                          text=True, check=True)
    line = next(x for x in done.stderr.splitlines() if "Maximum resident set size" in x)
    return int(line.split(":")[1]) / 1024


@pytest.mark.slow
def test_smollm2_q4_1_equals_transformers_and_reads_in_less_memory(tmp_path):
    from llm import smollm2

    path = smollm2.gguf_folder() / smollm2.GGUF
    source = GgufTensors(path)
    ref = load_file(str(smollm2.hf_folder() / "model.safetensors"))  # transformers' dequantization
    assert source.keys() == sorted(ref)
    for name in ref:
        np.testing.assert_array_equal(source.get(name), ref[name], err_msg=name)
    ours = peak_rss_mib(READ_ALL, str(path))
    folder = peak_rss_mib(FOLDER, str(path), str(tmp_path / "folder"))
    theirs = peak_rss_mib(MATERIALIZE, str(path), str(tmp_path / "materialized"))
    print(f"peak RSS: GgufTensors reading every tensor {ours:.0f} MiB, gguf_folder {folder:.0f} MiB, "
          f"materialize_gguf {theirs:.0f} MiB")
    # Measured 261-265 / 563-572 / 1204 MiB (gguf_folder: mostly importing transformers, converting the tokenizer).
    assert ours < theirs / 3 and folder < theirs
