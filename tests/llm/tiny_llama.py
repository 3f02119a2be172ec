"""A tiny random LlamaForCausalLM with a byte-level BPE tokenizer trained on the bundled calibration text (no download).

The tokenizer has the shape of SmolLM2's own Hugging Face tokenizer (ByteLevel pre-tokenizer and decoder, ChatML
special tokens) plus a Llama-style BOS: a TemplateProcessing post-processor puts ``<|endoftext|>`` in front of every
encoded text, so the BOS handling of the package tokenizer is exercised by the fast tests.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
BOS, EOS = "<|endoftext|>", "<|im_end|>"
BOS_ID, EOS_ID = 0, 2
VOCAB_SIZE = 600
# ChatML, as SmolLM2-Instruct's template without the default system turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def calibration_texts() -> list[str]:
    lines = (ROOT / "calibration_data" / "calibration.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines]


def train_tokenizer(vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE (GPT-2 / SmolLM2 shape) trained on the calibration texts; BOS added by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(calibration_texts(), trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, BOS_ID)])
    return tok


def write_tokenizer(folder: Path) -> int:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(), bos_token=BOS, eos_token=EOS,
                                  unk_token=BOS, pad_token=EOS, model_max_length=256)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(folder))
    return len(tok)


def tiny_llama(folder: Path, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """Write config.json, model.safetensors, generation_config.json and the tokenizer files to ``folder``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 3,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=BOS_ID,
                      eos_token_id=EOS_ID, pad_token_id=EOS_ID, rms_norm_eps=1e-5,
                      initializer_range=0.2)
    model = LlamaForCausalLM(cfg).eval()
    # With the default init (std 0.02) the tied-embedding model only repeats its last input token (measured: 16 x
    # "\n" after a chat prompt), a weak test of a KV cache. Weights at std 0.2 and embeddings at 0.5 give 16
    # different greedy tokens whose smallest top-1/top-2 logit margin is 0.21 (seed 0), far above the ~1e-5 by
    # which FP32 runtimes differ, so greedy tokens must agree exactly.
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 0.5)
    model.save_pretrained(str(folder), safe_serialization=True)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID).save_pretrained(str(folder))
    return folder


# What transformers 4.57 writes for a GGUF byte-level BPE (read off SmolLM2-135M-Instruct.Q4_1.gguf's conversion):
# a SentencePiece-style decoder and byte_fallback on the byte-level vocabulary, the class LlamaTokenizer,
# add_bos_token, and transformers' decode-time space cleanup.
GGUF_DECODER = {"type": "Sequence", "decoders": [
    {"type": "ByteFallback"}, {"type": "Fuse"},
    {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
    {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
GGUF_CONFIG = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
               "clean_up_tokenization_spaces": True, "legacy": True, "add_prefix_space": None}


def gguf_style_tokenizer(src: Path, out: Path, *, add_bos: bool = True) -> Path:
    """Copy ``src``'s byte-level tokenizer into ``out`` in the shape transformers gives a GGUF tokenizer."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = json.loads((Path(src) / "tokenizer.json").read_text())
    tok["model"]["byte_fallback"] = True
    tok["model"]["merges"] = [m.split(" ") if isinstance(m, str) else m for m in tok["model"]["merges"]]
    tok["normalizer"] = {"type": "Sequence", "normalizers": []}
    tok["decoder"] = GGUF_DECODER
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    config = json.loads((Path(src) / "tokenizer_config.json").read_text()) | GGUF_CONFIG | {"add_bos_token": add_bos}
    (out / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return out
