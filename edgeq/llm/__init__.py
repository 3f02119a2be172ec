"""Causal LMs: KV-cache export, INT4 weight quantization, ONNX Runtime GenAI packaging and evaluation."""
