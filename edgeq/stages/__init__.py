"""The stages recipes are built from (export, optimize, calibrate, quantize, package, evaluate, budget, record) and
verify; each recipe in edgeq/recipes/ composes them for its model kind and target."""
