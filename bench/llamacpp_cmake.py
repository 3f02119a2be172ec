"""CMAKE_ARGS for compiling llama-cpp-python here (the Makefile's llamacpp extra): printed for the shell.

On x86-64, llama.cpp's native build (-march=native) compiles its AMX kernels on any CPU that lists AMX, and they
fault where the kernel does not grant a process the AMX tile state: on this machine's Xeon every Q4_K_M forward died
at `ldtilecfg` (a general protection fault in libggml-cpu.so; ONNX Runtime asks the kernel first). So the ISA is
spelled out from /proc/cpuinfo, every extension the CPU lists but AMX; AMX only speeds big-batch prefill, and decode
runs the same AVX-512/VNNI kernels. Elsewhere (arm64) the native build is kept: nothing is printed.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

# ggml CMake option -> the /proc/cpuinfo flag that allows it (ggml/CMakeLists.txt, GGML_NATIVE=OFF)
X86_OPTIONS = {
    "GGML_SSE42": "sse4_2", "GGML_F16C": "f16c", "GGML_FMA": "fma", "GGML_BMI2": "bmi2", "GGML_AVX": "avx",
    "GGML_AVX2": "avx2", "GGML_AVX_VNNI": "avx_vnni", "GGML_AVX512": "avx512bw", "GGML_AVX512_VBMI": "avx512vbmi",
    "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16",
}
OFF = ("GGML_NATIVE", "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")


def cmake_args(cpu_flags: set[str], machine: str) -> str:
    if machine not in ("x86_64", "AMD64"):
        return ""
    on = [option for option, flag in X86_OPTIONS.items() if flag in cpu_flags]
    # AVX512 (F, CD, VL, DQ, BW in ggml's one option) needs every one of them
    if "GGML_AVX512" in on and not {"avx512f", "avx512cd", "avx512vl", "avx512dq"} <= cpu_flags:
        on.remove("GGML_AVX512")
    return " ".join([*(f"-D{o}=OFF" for o in OFF), *(f"-D{o}=ON" for o in on)])


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


if __name__ == "__main__":
    sys.stdout.write(cmake_args(cpu_flags(), platform.machine()) + "\n")
