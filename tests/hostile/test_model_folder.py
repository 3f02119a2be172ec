"""Untrusted model folders and packages (issue 13, items 1 and 2): nothing in them runs, nothing is unpickled unless
--allow-pickle, the weights hashed are the weights read, and every parameter comes from the files, finite.

Each hostile folder is a copy of a real tiny model (tiny_bert, tests/llm/tiny_llama.py) with one thing changed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cli_results import assert_user_error, edgeq
from edgeq.errors import ModelFolderError
from edgeq.safe_load import load_tokenizer
from tiny_models import tiny_bert

QUERY = "encoder.layer.0.attention.self.query.weight"


@pytest.fixture
def bert_copy(tiny_bert_dir, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_bert_dir, tmp_path / "tiny-bert"))


# the completeness and NaN checks run in the export stage, after OUT was made: it may be there, empty
user_error = functools.partial(assert_user_error, empty_out=True)

# the tiny Llama's GGUF says context_length 256: windows and context within it, or check_inputs refuses first
FITS_TINY_LLAMA = ("--set", "llm.window_tokens=128", "--set", "llm.context_length=256")


def export(folder: Path, out: Path, *extra, stdin: str | None = None, samples: int | None = 8):
    """``samples``: calibration texts for an encoder; None for a causal LM, which calibrates on windows instead."""
    count = ("--samples", samples) if samples else ()
    return edgeq("export", folder, "--profile", "android-arm64", "-o", out, "-q", *count, *extra, stdin=stdin)


def plant_code(folder: Path, marker: Path) -> None:
    """A tokenizer whose auto_map points at a module that leaves ``marker`` when it is imported."""
    (folder / "tokenization_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n\n\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]}
    cfg["tokenizer_class"] = "EvilTokenizer"
    cfg_path.write_text(json.dumps(cfg))


def rewrite_weights(folder: Path, change) -> None:
    """model.safetensors with ``change(state)`` applied to its tensors."""
    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


# --- code -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["bert", "llama"])
def test_tokenizer_code_is_refused_and_never_runs(model, tiny_bert_dir, tiny_dir, tmp_path):
    folder = Path(shutil.copytree(tiny_bert_dir if model == "bert" else tiny_dir, tmp_path / model))
    marker = tmp_path / "marker"
    plant_code(folder, marker)
    out = tmp_path / "out"
    error, hint = user_error(export(folder, out, stdin="y\ny\n"), out)  # a "yes" waiting on stdin is never read
    assert "holds Python code (tokenization_evil.py)" in error and "never runs code" in error
    assert "delete tokenization_evil.py" in hint
    assert not marker.exists()


def test_auto_map_in_any_json_is_refused(bert_copy, tmp_path):
    (bert_copy / "processor").mkdir()
    (bert_copy / "processor" / "preprocessor_config.json").write_text(
        json.dumps({"auto_map": {"AutoProcessor": "processing_x.XProcessor"}}))
    error, hint = user_error(export(bert_copy, tmp_path / "out"), tmp_path / "out")
    assert "needs custom code (processor/preprocessor_config.json has 'auto_map')" in error
    assert "trust_remote_code" in error and "ships with transformers" in hint


def test_auto_map_in_tokenizer_config_alone_is_refused(bert_copy, tmp_path):
    cfg = json.loads((bert_copy / "tokenizer_config.json").read_text())
    (bert_copy / "tokenizer_config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoTokenizer": ["a.B", None]}}))
    error, _ = user_error(export(bert_copy, tmp_path / "out"), tmp_path / "out")
    assert "tokenizer_config.json has 'auto_map'" in error


def test_a_python_file_alone_is_refused(bert_copy, tmp_path):
    (bert_copy / "extra").mkdir()
    (bert_copy / "extra" / "helper.py").write_text("print('hi')\n")
    error, _ = user_error(export(bert_copy, tmp_path / "out"), tmp_path / "out")
    assert "holds Python code (extra/helper.py)" in error


def test_tokenizer_load_itself_never_trusts_remote_code(tiny_dir, tmp_path):
    """Past the up-front refusal, the load is still safe: trust_remote_code=False and stdin on /dev/null (a
    prompt would read end-of-file, not the caller's input)."""
    folder = Path(shutil.copytree(tiny_dir, tmp_path / "llama"))
    marker = tmp_path / "marker"
    plant_code(folder, marker)
    with pytest.raises(ModelFolderError, match="cannot load the tokenizer"):
        load_tokenizer(folder)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["eval", "report", "run", "inspect"])
def test_package_with_code_is_refused(command, tiny_dir, tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_dir / name).is_file():  # transformers 5 writes no special_tokens_map.json
            shutil.copy(tiny_dir / name, package / name)
    marker = tmp_path / "marker"
    plant_code(package, marker)
    (tmp_path / "t.txt").write_text("some text to measure\n")
    args = {"eval": ["--text", tmp_path / "t.txt"], "report": ["-o", tmp_path / "report", "--no-plots"],
            "run": ["--prompt", "hi"], "inspect": []}[command]
    error, hint = user_error(edgeq(command, package, *args, stdin="y\n"))
    assert f"package {package} holds Python code (tokenization_evil.py)" in error
    assert "re-export it" in hint
    assert not marker.exists() and not (tmp_path / "report").exists()


# --- pickle ---------------------------------------------------------------------------------------------------------


def pickle_beside_decoy(folder: Path) -> None:
    """The weights as pytorch_model.bin (what transformers would unpickle) next to an empty decoy.safetensors."""
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    (folder / "decoy.safetensors").write_bytes(len(b"{}").to_bytes(8, "little") + b"{}")


def test_pickle_beside_a_decoy_is_refused(bert_copy, tmp_path):
    pickle_beside_decoy(bert_copy)
    error, hint = user_error(export(bert_copy, tmp_path / "out"), tmp_path / "out")
    assert "holds no safetensors weights, only pickle files (pytorch_model.bin)" in error
    assert "unpickling can run code" in error
    assert "save_pretrained" in hint and "safe_serialization=True" in hint and "--allow-pickle" in hint


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


@pytest.mark.encoders
def test_allow_pickle_still_unpickles_tensors_only(bert_copy, tmp_path):
    marker = tmp_path / "marker"
    torch.save({"x": _Exploit(marker)}, bert_copy / "pytorch_model.bin")
    (bert_copy / "model.safetensors").unlink()
    error, hint = user_error(export(bert_copy, tmp_path / "out", "--allow-pickle"), tmp_path / "out")
    assert "pytorch_model.bin is not a plain tensor checkpoint: torch.load(weights_only=True) refused it" in error
    assert "Unsupported global" in error and "weights_only=False" not in error  # torch's own advice is not passed on
    assert "unpickles nothing but tensors" in hint
    assert not marker.exists()


@pytest.mark.encoders
def test_allowed_pickle_is_checked_like_safetensors(bert_copy, tmp_path):
    state = load_file(bert_copy / "model.safetensors")
    del state[QUERY]
    torch.save(state, bert_copy / "pytorch_model.bin")
    (bert_copy / "model.safetensors").unlink()
    error, _ = user_error(export(bert_copy, tmp_path / "out", "--allow-pickle"), tmp_path / "out")
    assert f"the weights in {bert_copy.resolve()} do not match its config" in error  # the user's folder, not staging
    assert f"1 missing: {QUERY}" in error


@pytest.mark.encoders
def test_allow_pickle_exports_the_pickle_and_records_it(tmp_path):
    folder = tiny_bert(tmp_path / "tiny-bert", layers=1, hidden=32)
    pickle_beside_decoy(folder)
    out = tmp_path / "out"
    result = export(folder, out, "--allow-pickle")
    assert result.exit_code == 0, result.output
    source = json.loads((out / "tiny-bert-android-arm64" / "manifest.json").read_text())["source"]
    assert (source["allow_pickle"], source["weight_format"], source["weight_files"]) == (True, "pickle",
                                                                                         ["pytorch_model.bin"])
    assert source["files"]["pytorch_model.bin"] == hashlib.sha256((folder / "pytorch_model.bin").read_bytes()).hexdigest()
    assert "decoy.safetensors" not in source["files"]


# --- incomplete or damaged checkpoints ------------------------------------------------------------------------------


def _drop(state):
    del state[QUERY]


def _rename(state):
    state[QUERY.replace("query", "qurey")] = state.pop(QUERY)


def _reshape(state):
    state[QUERY] = state[QUERY][:32].clone()


@pytest.mark.parametrize("change, expected", [
    (_drop, f"1 missing: {QUERY}"),
    (_rename, f"1 missing: {QUERY}; 1 unexpected: {QUERY.replace('query', 'qurey')}"),
    (_reshape, f"1 with another shape: {QUERY} [32, 64] (the config wants [64, 64])"),
])
@pytest.mark.encoders
def test_incomplete_checkpoint_is_refused(bert_copy, tmp_path, change, expected):
    rewrite_weights(bert_copy, change)
    error, hint = user_error(export(bert_copy, tmp_path / "out"), tmp_path / "out")
    assert "do not match its config (BertModel" in error and expected in error
    assert "never fills missing weights at random" in hint


@pytest.mark.encoders
def test_bert_config_with_t5_weights_is_refused(bert_copy, tmp_path):
    from transformers import T5Config, T5EncoderModel

    t5 = T5EncoderModel(T5Config(vocab_size=600, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4))
    save_file({k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"},
              bert_copy / "model.safetensors", metadata={"format": "pt"})
    error, _ = user_error(export(bert_copy, tmp_path / "out"), tmp_path / "out")
    assert "(BertModel, 39 tensors): 39 missing: embeddings.LayerNorm.bias," in error  # every BERT tensor
    assert "and 34 more; 19 unexpected: encoder.block.0.layer.0.SelfAttention.k.weight," in error  # counts, 5 names


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.encoders
def test_non_finite_weight_is_refused_by_name(bert_copy, tmp_path, value):
    rewrite_weights(bert_copy, lambda s: s[QUERY].view(-1).__setitem__(7, value))
    error, hint = user_error(export(bert_copy, tmp_path / "out"), tmp_path / "out")
    assert f"hold NaN or Inf values in 1 tensor: {QUERY}" in error
    assert "re-download" in hint


# --- GGUF sources ---------------------------------------------------------------------------------------------------

GGUF_LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's tensor name for a Llama parameter (model.layers.1.mlp.up_proj.weight -> blk.1.ffn_up.weight)."""
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if hf_name in top:
        return top[hf_name]
    parts = hf_name.split(".")
    return f"blk.{parts[2]}.{GGUF_LAYER_NAMES['.'.join(parts[3:-1])]}.weight"


def write_llama_gguf(hf: Path, out: Path, change=lambda name, array: array) -> Path:
    """tiny_llama's weights and byte-level BPE as an F32 llama GGUF; ``change`` may alter or drop (None) a tensor."""
    import gguf
    from safetensors.numpy import load_file as load_numpy

    cfg, tok = (json.loads((hf / n).read_text()) for n in ("config.json", "tokenizer.json"))
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("tiny llama")
    w.add_file_type(0)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    tokens = sorted(tok["model"]["vocab"], key=tok["model"]["vocab"].get)
    specials = {a["content"] for a in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    for name, array in load_numpy(hf / "model.safetensors").items():
        array = change(gguf_name(name), array.astype("float32"))
        if array is not None:
            w.add_tensor(gguf_name(name), array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def test_gguf_with_a_nan_weight_is_refused_by_name(tiny_dir, tmp_path):
    def poison(name, array):
        if name == "blk.1.ffn_up.weight":
            array.reshape(-1)[3] = float("nan")
        return array

    write_llama_gguf(tiny_dir, tmp_path / "m.gguf", poison)
    error, _ = user_error(export(tmp_path, tmp_path / "out", "--gguf-file", "m.gguf", *FITS_TINY_LLAMA, samples=None), tmp_path / "out")
    assert error == ("the weights in the GGUF m.gguf (dequantized) hold NaN or Inf values in 1 tensor: "
                     "model.layers.1.mlp.up_proj.weight")


def test_gguf_missing_a_tensor_is_refused_by_name(tiny_dir, tmp_path):
    write_llama_gguf(tiny_dir, tmp_path / "m.gguf", lambda n, a: None if n == "blk.0.attn_q.weight" else a)
    error, _ = user_error(export(tmp_path, tmp_path / "out", "--gguf-file", "m.gguf", *FITS_TINY_LLAMA, samples=None), tmp_path / "out")
    assert "does not hold the tensors of a 'llama' model: 1 missing: model.layers.0.self_attn.q_proj.weight" in error


def test_gguf_is_read_alone_not_with_its_neighbours(tiny_dir, tmp_path):
    """Code and a tokenizer_config.json beside the GGUF are never read: transformers sees a folder with the GGUF only
    (the GGUF is the one file hashed), so the export gets past them to the GGUF's own NaN check."""
    marker = tmp_path / "marker"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir / name, tmp_path / name)
    plant_code(tmp_path, marker)
    write_llama_gguf(tiny_dir, tmp_path / "m.gguf", lambda n, a: a * float("inf") if n == "output_norm.weight"
                     else a)
    error, _ = user_error(export(tmp_path, tmp_path / "out", "--gguf-file", "m.gguf", *FITS_TINY_LLAMA, stdin="y\n", samples=None), tmp_path / "out")
    assert "model.norm.weight" in error and not marker.exists()
