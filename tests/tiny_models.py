"""Tiny random models built from transformers configs (no download), one builder per architecture.

Each writes a complete model folder: config.json, model.safetensors and a WordPiece tokenizer whose vocabulary is
the most common words of the bundled calibration text, so tokenization looks like real text.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _vocab(size: int = 600) -> list[str]:
    words = collections.Counter()
    for line in (ROOT / "calibration_data" / "calibration.jsonl").read_text().splitlines():
        words.update(re.findall(r"[a-z]+", json.loads(line)["text"].lower()))
    chars = [chr(c) for c in range(33, 127)]
    common = [w for w, _ in words.most_common(size) if w not in chars]
    return SPECIALS + chars + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + common


def write_tokenizer(folder: Path) -> int:
    from transformers import BertTokenizerFast

    vocab = _vocab()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    tok.model_max_length = 128
    tok.save_pretrained(str(folder))
    return len(vocab)


def tiny_bert(folder: Path, seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    import torch
    from transformers import BertConfig, BertModel

    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = write_tokenizer(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=hidden * 4, max_position_embeddings=128)
    BertModel(cfg).eval().save_pretrained(str(folder), safe_serialization=True)
    return folder


def tiny_bert_with_outliers(folder: Path, scale: float = 100.0, channels: int = 2, seed: int = 0) -> Path:
    """``tiny_bert`` with outlier channels, as trained encoders have: in every layer ``channels`` value-projection
    outputs are scaled up by ``scale`` and the attention output projection's matching inputs down by it. The FP32
    model computes the same function, but the output projection's int8 input range is ``scale`` times wider, so its
    static int8 activations lose most of their resolution: the search has something to promote."""
    import torch
    from transformers import BertModel

    tiny_bert(folder, seed=seed)
    model = BertModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        for i, layer in enumerate(model.encoder.layer):
            ch = torch.arange(channels) * 7 + i  # different channels per layer
            layer.attention.self.value.weight[ch, :] *= scale
            layer.attention.self.value.bias[ch] *= scale
            layer.attention.output.dense.weight[:, ch] /= scale
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def tiny_onnx_encoder(path: Path, seed: int = 0, vocab: int = 50, hidden: int = 16) -> Path:
    """input_ids, attention_mask -> last_hidden_state = (table[input_ids] @ W) * mask: a 5-node stand-in encoder
    for stage tests that need a package-shaped model without an export."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"], name="gather"),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Unsqueeze", ["mask_f", "axes"], ["mask_3d"], name="unsqueeze"),
        helper.make_node("MatMul", ["emb", "W"], ["proj"], name="matmul"),
        helper.make_node("Mul", ["proj", "mask_3d"], ["last_hidden_state"], name="mul"),
    ]
    graph = helper.make_graph(
        nodes, "tiny-encoder",
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [numpy_helper.from_array(rng.standard_normal((vocab, hidden)).astype(np.float32), "table"),
         numpy_helper.from_array(rng.standard_normal((hidden, hidden)).astype(np.float32), "W"),
         numpy_helper.from_array(np.array([-1], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


TINY_MODELS = {"bert": tiny_bert}
