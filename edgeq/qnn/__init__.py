"""QNN HTP helpers for the encoder-qnn recipe (edgeq/recipes/encoder_qnn.py): static shapes, what HTP refuses, QDQ
for the HTP backend, static-shape token inputs."""
