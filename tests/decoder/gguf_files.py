"""Tiny GGUF causal LMs written from tiny random Hugging Face checkpoints the way llama.cpp's convert_hf_to_gguf.py
writes them: its metadata keys, a byte-level BPE vocabulary ("gpt2" tokenizer model), Q/K rows permuted for the
llama architecture (LlamaModel.permute), Phi-3's fused qkv / gate_up kept fused, and 2-D weights in F32 or a
quantized type (norms and biases stay F32 as llama.cpp keeps them)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# HF parameter suffix (after model.layers.N.) -> GGUF tensor name (after blk.N.)
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}


def gguf_name(hf: str) -> str:
    if hf in TOP_NAMES:
        return TOP_NAMES[hf]
    _, _, layer, rest = hf.split(".", 3)
    stem, kind = rest.rsplit(".", 1)
    if rest in LAYER_NAMES:
        return f"blk.{layer}.{LAYER_NAMES[rest]}"
    return f"blk.{layer}.{LAYER_NAMES[stem]}.{kind}"


def permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: HF's rotate-half Q/K rows -> GGML's interleaved pairs."""
    if n_head_kv != n_head:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_vocab(w, folder: Path, add_bos: bool) -> None:
    tok = json.loads((folder / "tokenizer.json").read_text())
    tcfg = json.loads((folder / "tokenizer_config.json").read_text())
    vocab = tok["model"]["vocab"] | {t["content"]: t["id"] for t in tok["added_tokens"]}
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in tok["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # CONTROL / NORMAL
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(vocab[tcfg["bos_token"]])
    w.add_eos_token_id(vocab[tcfg["eos_token"]])
    w.add_unk_token_id(vocab[tcfg["unk_token"]])
    w.add_pad_token_id(vocab[tcfg["pad_token"]])
    w.add_add_bos_token(add_bos)
    if "chat_template" in tcfg:
        w.add_chat_template(tcfg["chat_template"])


def write_gguf(folder: Path, path: Path, qtype: str = "F32", *, arch: str | None = None, name: str = "tiny",
               add_bos: bool = False, skip: tuple[str, ...] = (), f64: tuple[str, ...] = (),
               rope_freqs: bool = False, chat_template: bool = False) -> Path:
    """``folder`` (a tiny HF checkpoint) as a GGUF at ``path``; ``skip`` leaves those HF tensors out, ``f64``
    stores those as F64 (a type gguf cannot dequantize), ``rope_freqs`` adds Llama-3's rotary factors tensor,
    ``chat_template`` the folder's chat_template.jinja (as llama.cpp stores an instruct model's)."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((Path(folder) / "config.json").read_text())
    arch = arch or cfg["model_type"]
    heads, kv, hidden = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    q = gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_file_type({"F32": 0, "Q4_0": 2, "Q8_0": 7}[qtype])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_rope_dimension_count(hidden // heads)
    write_vocab(w, Path(folder), add_bos)
    if chat_template:
        w.add_chat_template((Path(folder) / "chat_template.jinja").read_text())
    for hf, t in load_file(str(Path(folder) / "model.safetensors")).items():
        if hf in skip:
            continue
        t = t.astype(np.float32)
        if arch == "llama" and hf.endswith("q_proj.weight"):
            t = permute(t, heads, heads)
        elif arch == "llama" and hf.endswith("k_proj.weight"):
            t = permute(t, heads, kv)
        if hf in f64:
            w.add_tensor(gguf_name(hf), t.astype(np.float64))
        elif t.ndim == 2 and q != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(hf), gguf.quants.quantize(t, q), raw_dtype=q)
        else:
            w.add_tensor(gguf_name(hf), t)
    if rope_freqs:  # as llama.cpp writes a Llama-3.x model with rope_scaling llama3
        w.add_tensor("rope_freqs.weight", np.ones(hidden // heads // 2, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
