"""The streamed decoder front end: a causal LM read one tensor and built one layer at a time, never whole in FP32.

``spec`` reads config.json into a ``DecoderSpec``; ``weights`` reads tensors (safetensors here, GGUF in
``gguf_weights``); ``layers`` gathers one decoder layer's weights in the layout the graph takes; ``graph`` builds
ONE layer as an ONNX model (for layerwise calibration) or writes the whole GenAI decoder, layer by layer, into one
external data file.
"""
