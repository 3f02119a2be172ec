"""The android-qnn-htp chain: static shapes, QDQ for the QNN HTP backend, EPContext binary, simulator verification."""
