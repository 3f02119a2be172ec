"""The export chain: export -> optimize -> calibrate -> select (sensitivity) -> quantize -> package -> verify."""
