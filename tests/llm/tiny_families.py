"""Tiny random decoder-only models of each family edgeq claims (2 layers, hidden 64, GQA where the family has it),
with the byte-level tokenizer of ``tiny_llama`` (no download)."""

from __future__ import annotations

from pathlib import Path

from .tiny_llama import BOS_ID, EOS_ID, write_tokenizer

COMMON = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
              pad_token_id=EOS_ID, rms_norm_eps=1e-5, initializer_range=0.2)
# model_type -> (config class, model class, family-specific config); tie as each family's small checkpoints do
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True, use_sliding_window=False)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(tie_word_embeddings=False, pad_token_id=EOS_ID)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(tie_word_embeddings=True, head_dim=16,
                                                      hidden_activation="gelu_pytorch_tanh")),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(tie_word_embeddings=True, head_dim=16, sliding_window=4096,
                                                         query_pre_attn_scalar=16)),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(tie_word_embeddings=True, no_rope_layer_interval=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=16)),
    # a sliding layer then a global one; a window of 6 tokens so that prompts of 20 tokens cross it
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(tie_word_embeddings=True, head_dim=16, sliding_window=6, query_pre_attn_scalar=16,
                         layer_types=["sliding_attention", "full_attention"], rope_local_base_freq=10000.0,
                         rope_theta=1000000.0, rope_scaling={"rope_type": "linear", "factor": 2.0})),
}


def hidden_scale(model_type: str) -> float:
    return COMMON["hidden_size"] ** 0.5 if model_type.startswith("gemma") else 1.0


def tiny_family(model_type: str, folder: Path, seed: int = 0, extra: dict | None = None) -> Path:
    """Write the tiny ``model_type`` checkpoint into ``folder``; ``extra`` overrides config keys (a variant:
    Llama-3's rope_scaling, Phi-4-mini's partial rotary...)."""
    import torch
    import transformers
    from transformers import GenerationConfig

    cfg_cls, model_cls, family_extra = FAMILIES[model_type]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(vocab_size=vocab_size, **(COMMON | family_extra | (extra or {})))
    model = getattr(transformers, model_cls)(cfg).eval()
    # See tiny_llama: embeddings at std 0.5 give distinct greedy tokens. Gemma multiplies them by sqrt(hidden) = 8
    # in the graph, and at 0.5 its greedy output repeats the last prompt token 16 times (measured, both Gemmas), so
    # its table is 8x smaller: 16 distinct tokens, smallest top-1/top-2 margin 0.012 (gemma), 0.005 (gemma2), far
    # above the ~1e-5 by which FP32 runtimes differ.
    std = 0.5 / hidden_scale(model_type)
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, std)
        for module in model.modules():  # Qwen2's q/k/v biases start at zero: random ones test their fusion
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.2)
    model.save_pretrained(str(folder), safe_serialization=True)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID).save_pretrained(str(folder))
    return folder
