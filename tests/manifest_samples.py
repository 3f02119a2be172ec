"""The smallest manifests the schema (edgeq/manifest_schema.py) takes, for tests that hand-make a package: every
required field, nothing more. ``overrides`` replace top-level keys. Real manifests, written by real exports, are
stored under tests/data/manifests_v1/ (schema 1) and made fresh by the pipeline tests."""

from __future__ import annotations

import copy

from edgeq.manifest import CAUSAL_LM, ENCODER_CPU, ENCODER_QNN, SCHEMA_VERSION

_ENCODER = {
    "schema_version": SCHEMA_VERSION, "recipe": ENCODER_CPU,
    "source": {"kind": "encoder", "architecture": "BertModel"},
    "profile": {"name": "android-arm64", "values": {"accuracy": {"eval_seq_len": 128}}},
    "model": {"file": "model.ort"},
    "size": {"model_bytes": 1000, "fp32_onnx_bytes": 4000, "ratio": 0.25, "max_ratio": 0.4},
    "precision": {"summary": {"linear": {"int8": 1}},
                  "nodes": [{"name": "fc", "precision": "int8", "reason": "a linear layer: INT8"}]},
    "accuracy": {"samples": 4, "mean_cosine": 0.999, "min_cosine": 0.998, "retrieval_top1": 1.0},
    "verification": {"inputs": {"attention_mask": [[1]]}, "pooling": "mean", "reference_pooled": [[1.0]],
                     "min_cosine": 0.9999, "max_rel_diff": 0.01},
    "files": {},
}

_LLM = {
    "schema_version": SCHEMA_VERSION, "recipe": CAUSAL_LM,
    "source": {"kind": "causal-lm", "architecture": "LlamaForCausalLM"},
    "profile": {"name": "android-arm64", "values": {"llm": {"window_tokens": 128, "eval_windows": 2}}},
    "model": {"file": "model.onnx", "genai_config": "genai_config.json"},
    "size": {"model_bytes": 1000, "max_mb": 150.0},
    "precision": {"summary": {"linear": {"int4": 1}},
                  "nodes": [{"name": "fc", "precision": "int4", "reason": "a linear layer: INT4"}]},
    "accuracy": {"tokens": 256, "perplexity": 12.5, "ref_perplexity": 12.0, "ppl_increase": 0.0417,
                 "mean_kl": 0.01, "top1_agreement": 0.9, "ppl_increase_interval": [0.01, 0.07]},
    "verification": {"prompt_ids": [1, 2], "greedy_tokens": [3, 4]},
    "files": {},
}


def encoder_manifest(**overrides) -> dict:
    """An encoder-cpu manifest."""
    return {**copy.deepcopy(_ENCODER), **overrides}


def qnn_manifest(**overrides) -> dict:
    """An encoder-qnn manifest: static shapes (batch 2 x 64 tokens), the context model and its run on HTP."""
    run = {"placement": {"nodes": {"QNNExecutionProvider": 3}, "partitions": {"QNNExecutionProvider": 1}},
           "accuracy_vs_fp32": copy.deepcopy(_ENCODER["accuracy"])}
    qnn = {"soc_model": 57, "htp_arch": 75, "context": {"file": "model_ctx.onnx"},
           "simulator": {"cpu_ep_fallback": "disabled", "runs": {"model_ctx.onnx": run, "model.onnx": run}}}
    model = {"file": "model.onnx", "context_file": "model_ctx.onnx", "batch_size": 2, "seq_len": 64,
             "execution_provider": "QNNExecutionProvider"}
    return encoder_manifest(**{"recipe": ENCODER_QNN, "qnn": qnn, "model": model, **overrides})


def llm_manifest(**overrides) -> dict:
    """A causal-lm manifest."""
    return {**copy.deepcopy(_LLM), **overrides}
