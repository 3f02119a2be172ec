"""ONNX graph edits, one pass per file, each reporting whether it changed the model."""
