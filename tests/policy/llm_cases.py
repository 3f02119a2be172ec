"""The tiny fused causal LMs and INT4 rule sets that tests/policy/test_causal_lm.py plans, shared with the script
that wrote its stored expectations from the code before the policy owned these decisions (issue 12)."""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx

VOCAB = 256
SEQ = 48
SETTING = "gptq+clip, block 32, asymmetric, accuracy_level 4"


def exported_tiny_llama(folder: Path) -> onnx.ModelProto:
    """A 2-layer random LlamaForCausalLM (hidden 64, MLP 128, 4 heads / 2 KV heads, tied embeddings), exported by
    optimum as text-generation-with-past (once per folder)."""
    import torch
    from optimum.exporters.onnx import main_export
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (folder / "onnx" / "model.onnx").is_file():
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=True)
        LlamaForCausalLM(cfg).eval().save_pretrained(str(folder / "hf"), safe_serialization=True)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            main_export(str(folder / "hf"), str(folder / "onnx"), task="text-generation-with-past",
                        library_name="transformers", do_validation=False)
    return onnx.load(str(folder / "onnx" / "model.onnx"))


def fused_tiny_llama(folder: Path, untie: bool) -> onnx.ModelProto:
    """``exported_tiny_llama`` fused as the chain does (``untie``: the head gets its own copy of the table, as for
    lm_head_precision int4/int8)."""
    from edgeq.passes.base import run_passes
    from edgeq.passes.fuse_llm import FuseLLM

    model, _ = run_passes(exported_tiny_llama(folder), [FuseLLM(max_positions=128, untie_lm_head=untie)])
    return model


def windows() -> np.ndarray:
    return np.random.default_rng(2).integers(0, VOCAB, (4, SEQ)).astype(np.int64)


# case -> (untied head?, rules as the chain derives them from a profile; max_model_bytes "tight": see the test)
CASES = {
    "default": (False, dict(int8_kv=True, promote=2.0, max_model_bytes=150_000_000)),
    "promote-1x-no-kv": (False, dict(int8_kv=False, promote=1.0, max_model_bytes=150_000_000)),
    "no-promotion": (False, dict(int8_kv=True, promote=None, max_model_bytes=150_000_000)),
    "tight-budget": (False, dict(int8_kv=True, promote=1.0, max_model_bytes="tight")),
    "head-int8": (True, dict(quantize_tied=True, tied_bits=8, int8_kv=True, promote=2.0, max_model_bytes=150_000_000)),
    "head-int4": (True, dict(quantize_tied=True, tied_bits=4, int8_kv=True, promote=2.0, max_model_bytes=150_000_000)),
    "named": (False, dict(int8_nodes=["/model/layers.1/mlp/down_proj/MatMul"], max_model_bytes=None)),
}
