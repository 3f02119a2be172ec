"""Tiny random checkpoints for the decoder builder's tests, and transformers' reference forward on them.

Norm weights are randomized after transformers writes the checkpoint (it initializes them to 1, or 0 for Gemma's
1 + w): a builder that dropped a norm, swapped two, or forgot Gemma's offset would still match at the initial values.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeq.decoder.graph import write_fp32_decoder
from edgeq.decoder.spec import decoder_spec
from edgeq.decoder.weights import open_safetensors

from tests.llm.tiny_families import tiny_family

# name -> (model_type, config overrides)
VARIANTS = {
    "llama": ("llama", {}),
    "llama3": ("llama", dict(tie_word_embeddings=False, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}, rope_theta=500000.0)),
    "llama_bias": ("llama", dict(attention_bias=True, mlp_bias=True)),  # a bias on every linear
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "smollm3": ("smollm3", {}),
    "gemma": ("gemma", {}),
    "gemma_exact_gelu": ("gemma", dict(hidden_act="gelu")),  # what released Gemma configs say (computed exactly)
    "gemma3_text": ("gemma3_text", {}),
    # soft-caps small enough to bend the tiny model's scores and logits: transformers applies Gemma-3's final one
    # and ignores its attn_logit_softcapping (Gemma3Attention never passes it on), and so must the graph
    "gemma3_softcap": ("gemma3_text", dict(attn_logit_softcapping=0.5, final_logit_softcapping=1.5)),
    "phi3": ("phi3", dict(sliding_window=6)),  # Phi-3-mini slides every layer (its window is 2047)
    # Phi-4-mini's shape: part of each head rotated (3/4 there; here 1/2 of 32, as GroupQueryAttention needs
    # rotary_dim / 2 to be a multiple of 8), LongRoPE (context 64 fits the original 64: the short factors)
    "phi4mini": ("phi3", dict(num_attention_heads=2, num_key_value_heads=1, partial_rotary_factor=0.5,
                              original_max_position_embeddings=64, rope_scaling={
                                  "type": "longrope", "short_factor": [1.0 + 0.2 * k for k in range(8)],
                                  "long_factor": [3.0 + k for k in range(8)]})),
}


def randomize_norms(folder: Path, seed: int = 1) -> None:
    from safetensors.numpy import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    rng = np.random.default_rng(seed)
    for name in sorted(tensors):
        if name.endswith("norm.weight"):
            tensors[name] = (tensors[name] + rng.normal(0.0, 0.2, tensors[name].shape)).astype(tensors[name].dtype)
    save_file(tensors, str(path), metadata={"format": "pt"})


def checkpoint(variant: str, folder: Path) -> Path:
    model_type, extra = VARIANTS[variant]
    tiny_family(model_type, folder, extra=extra)
    randomize_norms(folder)
    return folder


def reference_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager",
                                                dtype="float32").eval()


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(ids)).logits.numpy()


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)


RTOL = 1e-5  # of max |logit|
CONTEXT = 64
PROMPT_LENGTHS = (1, 5, 20)  # 20 > the tiny Gemma-3's sliding window of 6


def build(folder, out):
    """Write the decoder of checkpoint ``folder`` into ``out``: (spec, source, model path)."""
    spec = decoder_spec(json.loads((folder / "config.json").read_text()))
    src = open_safetensors(folder)
    return spec, src, write_fp32_decoder(spec, src, out, context_length=CONTEXT)


def session(model):
    arg = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(arg, providers=["CPUExecutionProvider"])


def decoder_logits(spec, decoder, ids):
    """The decoder's logits for a prompt with an empty past."""
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    empty = np.zeros((ids.shape[0], spec.kv_heads, 0, spec.head_dim), np.float32)
    feed |= {f"past_key_values.{i}.{k}": empty for i in range(spec.num_layers) for k in ("key", "value")}
    return decoder.run(["logits"], feed)[0]


def prompts(vocab):
    rng = np.random.default_rng(0)
    return [rng.integers(3, vocab, (1, n)).astype(np.int64) for n in PROMPT_LENGTHS]
