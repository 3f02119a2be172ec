"""bench/llamacpp_cmake.py: the llama.cpp build options the Makefile passes to pip."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import llamacpp_cmake as L  # noqa: E402

XEON = set("fpu sse4_2 avx f16c fma bmi2 avx2 avx_vnni avx512f avx512cd avx512vl avx512dq avx512bw avx512vbmi "
           "avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16".split())


def test_x86_spells_out_the_isa_without_amx():
    args = L.cmake_args(XEON, "x86_64").split()
    assert args[:4] == ["-DGGML_NATIVE=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]
    assert {"-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON"} <= set(args)
    assert not [a for a in args if "AMX" in a and a.endswith("=ON")]


def test_an_older_cpu_gets_only_what_it_lists():
    args = L.cmake_args({"sse4_2", "avx", "avx2", "fma", "f16c", "avx512f"}, "x86_64").split()
    assert "-DGGML_AVX2=ON" in args and not [a for a in args if a.startswith("-DGGML_AVX512")]


def test_other_machines_keep_the_native_build(tmp_path):
    assert L.cmake_args(XEON, "aarch64") == ""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n")
    assert L.cpu_flags(info) == {"fpu", "avx2", "fma"} and L.cpu_flags(tmp_path / "none") == set()
