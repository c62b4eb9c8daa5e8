"""Sources and compiler flags of the csrc extension, shared by setup.py and the first-use
build in ``_ext.py`` so both produce the same kernels.

This file imports nothing outside the standard library: setup.py loads it by path, before
(and without) importing fused_ckpt or torch.
"""
from __future__ import annotations

import os
import platform

CPU_SOURCES = ("act_ops.cpp", "act_cpu.cpp")  # relative to the csrc directory
CUDA_SOURCES = ("act_cuda.cu",)
# Every csrc file with one of these suffixes is shipped with the package and hashed for the cache.
SOURCE_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")

# sm_80 (A100), sm_90 (H100/H200) SASS, plus compute_90 PTX so newer GPUs can JIT it.
CUDA_GENCODE = (
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
)

# The compiler flags and macros ATen itself uses for its AVX2 / AVX512 kernel builds.
_SIMD = {
    "avx512": (
        {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma", "f16c"},
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
         "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    ),
    "avx2": (
        {"avx2", "fma", "f16c"},
        ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    ),
}


def csrc_files(csrc_dir: str) -> list[str]:
    """The names of the csrc files (sources and headers) in ``csrc_dir``, sorted."""
    return sorted(n for n in os.listdir(csrc_dir) if n.endswith(SOURCE_SUFFIXES))


def _cpu_flags() -> set[str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_simd_flags() -> list[str]:
    """FUSED_CKPT_CPU_SIMD = auto | avx512 | avx2 | none: the ISA of the CPU kernels'
    at::vec::Vectorized<float>; auto picks the widest one this machine supports."""
    mode = os.environ.get("FUSED_CKPT_CPU_SIMD", "auto").lower()
    if mode not in ("auto", "avx512", "avx2", "none"):
        raise ValueError(f"FUSED_CKPT_CPU_SIMD={mode!r}: expected auto, avx512, avx2 or none")
    if mode == "none":
        return []
    if mode != "auto":
        return list(_SIMD[mode][1])
    have = _cpu_flags()
    for required, flags in _SIMD.values():  # widest first
        if required <= have:
            return list(flags)
    return []


def cxx_flags() -> list[str]:
    # -ffp-contract=off: no compiler-chosen FMA contraction, so a value is bit-identical whichever
    # kernel variant computes it (e.g. h from act_forward and from act_backward(need_h=True)).
    return ["-O3", "-ffp-contract=off", "-Wno-unknown-pragmas"] + cpu_simd_flags()


def nvcc_flags() -> list[str]:
    """-O3, plus the default CUDA targets unless TORCH_CUDA_ARCH_LIST chooses them."""
    flags = ["-O3"]
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        flags += list(CUDA_GENCODE)
    return flags


def want_cuda(torch_cuda_version, cuda_home) -> bool:
    """CUDA kernels are built when torch has CUDA, nvcc is found (CUDA_HOME) and
    FUSED_CKPT_NO_CUDA is not 1."""
    return (
        torch_cuda_version is not None
        and cuda_home is not None
        and os.environ.get("FUSED_CKPT_NO_CUDA", "0") != "1"
    )
