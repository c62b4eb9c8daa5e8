"""Build and install fused_ckpt.

    pip install -e . --no-build-isolation      # or: make install

The compiled extension ``fused_ckpt._C`` (csrc/) registers the ``torch.ops.fused_ckpt_ext``
elementwise ops used by the "aten" FFN backend.  CPU kernels are always built; CUDA kernels
are added when the installed torch has CUDA and nvcc is found (CUDA_HOME).  The Triton
kernels need no build step.  ``--no-build-isolation`` makes the build use the torch already
installed (the extension must match it).

Environment knobs:
  MAX_JOBS=N                 parallel compile jobs for ninja (default 2)
  FUSED_CKPT_NO_CUDA=1       build the CPU kernels only, even with CUDA torch and nvcc
  TORCH_CUDA_ARCH_LIST=...   override the default CUDA targets (sm_80, sm_90 + compute_90 PTX)
  FUSED_CKPT_CPU_SIMD=auto   auto | avx512 | avx2 | none: ISA of the CPU kernels'
                             at::vec::Vectorized<float>. auto picks the widest one the build
                             machine supports (the extension is built on the machine that runs
                             it, like -march=native); none is portable to any CPU.
"""
from __future__ import annotations

import os
import platform

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))

CPU_SOURCES = ["csrc/act_ops.cpp", "csrc/act_cpu.cpp"]
CUDA_SOURCES = ["csrc/act_cuda.cu"]
# sm_80 (A100), sm_90 (H100/H200) SASS, plus compute_90 PTX so newer GPUs can JIT it.
CUDA_GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]


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


def _cpu_simd_flags() -> list[str]:
    mode = os.environ.get("FUSED_CKPT_CPU_SIMD", "auto").lower()
    if mode not in ("auto", "avx512", "avx2", "none"):
        raise SystemExit(f"FUSED_CKPT_CPU_SIMD={mode!r}: expected auto, avx512, avx2 or none")
    if mode == "none":
        return []
    if mode != "auto":
        return _SIMD[mode][1]
    have = _cpu_flags()
    for required, flags in _SIMD.values():  # widest first
        if required <= have:
            return flags
    return []


def _extensions():
    """(ext_modules, cmdclass); empty when torch is not importable (e.g. metadata-only runs)."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("fused_ckpt setup: torch is not importable, skipping the csrc extension "
              "(install torch first, then `pip install -e . --no-build-isolation`)")
        return [], {}

    os.environ.setdefault("MAX_JOBS", "2")
    with_cuda = (
        torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("FUSED_CKPT_NO_CUDA", "0") != "1"
    )
    # -ffp-contract=off: no compiler-chosen FMA contraction, so a value is bit-identical whichever
    # kernel variant computes it (e.g. h from act_forward and from act_backward(need_h=True)).
    cxx_flags = ["-O3", "-ffp-contract=off", "-Wno-unknown-pragmas"] + _cpu_simd_flags()
    macros = [("FUSED_CKPT_WITH_CUDA", "1" if with_cuda else "0")]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        nvcc_flags = ["-O3"]
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            nvcc_flags += CUDA_GENCODE
        ext = CUDAExtension(
            "fused_ckpt._C",
            CPU_SOURCES + CUDA_SOURCES,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    else:
        ext = CppExtension(
            "fused_ckpt._C",
            CPU_SOURCES,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
        )
    print(f"fused_ckpt setup: building fused_ckpt._C with {'CPU + CUDA' if with_cuda else 'CPU'} kernels "
          f"(torch {torch.__version__}, MAX_JOBS={os.environ['MAX_JOBS']})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fused_ckpt",
    version="0.1.0",
    description="Fused activation-recompute (checkpointing) kernels for PyTorch",
    packages=find_packages(exclude=("tests", "tests.*", "benchmarks", "benchmarks.*")),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0"],
    extras_require={"test": ["pytest", "numpy", "transformers", "matplotlib"]},
    entry_points={"console_scripts": ["fused-ckpt = fused_ckpt.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
