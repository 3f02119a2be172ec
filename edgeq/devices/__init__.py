"""Devices a package's model can be run on besides the host's own ONNX Runtime.

``arm64``: the real aarch64 build of onnxruntime from PyPI, run by an arm64 CPython (Debian's) under Debian's
qemu-user-static, so a package is proven on ONNX Runtime's ARM64 kernels. See :mod:`edgeq.devices.arm64`.
"""
