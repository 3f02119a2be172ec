"""FuseEncoderAttention: each BERT-style self-attention block as one ``com.microsoft.MultiHeadAttention`` node.

Why: at batch 1 an encoder's time outside its GEMMs is dozens of small ops per layer (the heads' Reshape/Transpose,
QK^T, scale, mask Add, Softmax, AV, the merge back), each a thread-pool dispatch; on two threads they cost about as
much as the integer GEMMs. ONNX Runtime's own session-level attention fusion matches only float MatMul+Add
projections, so once the projections are quantized it no longer applies. This pass runs before quantization, on the
float graph: it uses ONNX Runtime's transformer optimizer (onnxruntime.transformers, the fusion the ORT team
maintains for BERT-class models) with every fusion off except attention, as ``MultiHeadAttention`` with the q/k/v
projections left as separate MatMuls on constant weights, so each stays a linear layer the precision policy plans
like any other; their three biases become the node's packed bias input (added as the kernel packs the heads).
The attention MatMuls were FP32 before and stay FP32 inside the kernel (same math; MiniLM's FP32 outputs move by
< 1e-6 relative).

The padding mask becomes MHA's ``key_padding_mask`` (the graph's attention_mask input, int32); the old mask path
(Cast, Sub, Mul into a float bias) goes away with the blocks that read it.
"""

from __future__ import annotations

import logging
from collections import Counter

import onnx

from edgeq.passes.base import PassBase, PassResult

FUSED_OP = "MultiHeadAttention"


class FuseEncoderAttention(PassBase):
    """Runs on the exported graph, before ONNX Runtime's basic level: the fusion's patterns need the shape
    arithmetic (Sqrt of the head size, Reshape targets) as exported, and its own shape inference."""

    def call(self, model: onnx.ModelProto) -> PassResult:
        from onnxruntime.transformers.fusion_options import AttentionMaskFormat, FusionOptions
        from onnxruntime.transformers.optimizer import optimize_model

        before = Counter(n.op_type for n in model.graph.node)
        options = FusionOptions("bert")
        for flag in _OFF:
            setattr(options, flag, False)
        options.enable_attention = True
        options.use_multi_head_attention = True
        options.attention_mask_format = AttentionMaskFormat.AttentionMask
        log = logging.getLogger("onnxruntime.transformers")
        level = log.level
        log.setLevel(logging.ERROR)  # it logs each pattern it tried
        work = onnx.ModelProto()
        work.CopyFrom(model)  # the optimizer edits its input in place
        try:
            fused = optimize_model(work, "bert", 0, 0, options, opt_level=0).model
        finally:
            log.setLevel(level)
        after = Counter(n.op_type for n in fused.graph.node)
        n = after[FUSED_OP] - before[FUSED_OP]
        if n == 0:
            return PassResult(model, False, "no attention block matched")
        diff = parity(model, fused)
        if diff is None or diff > MAX_REL_DIFF:  # a pattern matched that is not what the kernel computes
            why = "inputs it cannot feed" if diff is None else f"outputs off by {diff:.2e} relative"
            return PassResult(model, False, f"{n} attention blocks matched, not fused: {why}")
        return PassResult(fused, True, f"{n} attention blocks -> {FUSED_OP} "
                                       f"({sum(before.values())} -> {sum(after.values())} nodes, "
                                       f"outputs within {diff:.1e} relative)")


# Measured 2.7e-7 to 3.9e-7 (MiniLM, the tiny BERT): float32 reordering. A wrong fusion (a bias or mask the kernel
# does not apply) moves outputs by whole percents.
MAX_REL_DIFF = 1e-4


def parity(model: onnx.ModelProto, fused: onnx.ModelProto) -> float | None:
    """Max |fused - model| / max |model| over the first output's real tokens, on a padded batch of two random
    sentences (None: the graph takes inputs other than BERT's three, or is too large to run from memory)."""
    import numpy as np
    import onnxruntime as ort

    names = [i.name for i in model.graph.input]
    if "input_ids" not in names or not set(names) <= {"input_ids", "attention_mask", "token_type_ids"}:
        return None
    dims = {i.name: i.dims for i in model.graph.initializer}
    vocab = [dims[n.input[0]][0] for n in model.graph.node
             if n.op_type == "Gather" and n.input[1] == "input_ids" and n.input[0] in dims]
    rng = np.random.default_rng(0)
    ids = rng.integers(1, min(vocab) if vocab else 100, size=(2, 24), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
    outs = []
    for m in (model, fused):
        try:
            data = m.SerializeToString()
        except ValueError:  # protobuf's 2 GB
            return None
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {k: feeds[k] for k in names})[0])
    want, got = outs
    real = mask.astype(bool).reshape(mask.shape + (1,) * (want.ndim - 2))
    return float(np.abs(np.where(real, got - want, 0)).max() / max(np.abs(want).max(), 1e-30))


# every fusion but attention: ONNX Runtime's session fuses norms and GELU itself for the target it converts for
_OFF = ("enable_gelu", "enable_layer_norm", "enable_skip_layer_norm", "enable_embed_layer_norm",
        "enable_bias_skip_layer_norm", "enable_bias_gelu", "enable_gelu_approximation", "enable_qordered_matmul",
        "enable_rotary_embeddings")
