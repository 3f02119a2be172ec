"""edgeq: turn a Hugging Face model folder into a quantized, verified ONNX Runtime package."""

__version__ = "0.1.0"
