"""FuseEncoderAttention: each BERT-style self-attention block as one ``com.microsoft.MultiHeadAttention`` node.

Why: at batch 1 an encoder's time outside its GEMMs is dozens of small ops per layer (the heads' Reshape/Transpose,
QK^T, scale, mask Add, Softmax, AV, the merge back), each a thread-pool dispatch; on two threads they cost about as
much as the integer GEMMs. ONNX Runtime's own session-level attention fusion matches only float MatMul+Add
projections, so once the projections are quantized it no longer applies. This pass runs before quantization, on the
float graph: it uses ONNX Runtime's transformer optimizer (onnxruntime.transformers, the fusion the ORT team
maintains for BERT-class models) with every fusion off except attention, as ``MultiHeadAttention`` with the q/k/v
projections left as separate MatMuls on constant weights, so each stays a linear layer the precision policy plans
like any other; their three biases become the node's packed bias input (added as the kernel packs the heads). The attention MatMuls were FP32 before and stay FP32 inside the kernel
(same math; MiniLM's FP32 outputs move by < 1e-6 relative).

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
        try:
            fused = optimize_model(model, "bert", 0, 0, options, opt_level=0).model
        finally:
            log.setLevel(level)
        after = Counter(n.op_type for n in fused.graph.node)
        n = after[FUSED_OP] - before[FUSED_OP]
        if n == 0:
            return PassResult(model, False, "no attention block matched")
        return PassResult(fused, True, f"{n} attention blocks -> {FUSED_OP} "
                                       f"({sum(before.values())} -> {sum(after.values())} nodes)")


# every fusion but attention: ONNX Runtime's session fuses norms and GELU itself for the target it converts for
_OFF = ("enable_gelu", "enable_layer_norm", "enable_skip_layer_norm", "enable_embed_layer_norm",
        "enable_bias_skip_layer_norm", "enable_bias_gelu", "enable_gelu_approximation", "enable_qordered_matmul",
        "enable_rotary_embeddings")
