"""Build and install fused_ckpt.

Install torch and triton first (see README "Install"), then either

    pip install -e .                            # plain: csrc is compiled on first use
    pip install -e . --no-build-isolation       # or: make install; compiles csrc now

The compiled extension ``fused_ckpt._C`` (csrc/) registers the ``torch.ops.fused_ckpt_ext``
elementwise ops used by the "aten" FFN backend.  CPU kernels are always built; CUDA kernels
are added when the installed torch has CUDA and nvcc is found (CUDA_HOME).  The Triton
kernels need no build step.

With ``--no-build-isolation`` this script sees the torch already installed and builds the
extension against it.  With pip's default build isolation it runs in a throwaway environment
without torch (pyproject.toml deliberately does not list torch: an unpinned torch there would
download a multi-GB CUDA build that need not match yours), so it installs the Python package
and the csrc sources only; ``fused_ckpt._ext`` then compiles the extension with ninja on first
use, against the torch you run, into a per-user cache (FUSED_CKPT_BUILD_DIR).

Environment knobs (both build paths):
  MAX_JOBS=N                 parallel compile jobs for ninja (default 2)
  FUSED_CKPT_NO_CUDA=1       build the CPU kernels only, even with CUDA torch and nvcc
  TORCH_CUDA_ARCH_LIST=...   override the default CUDA targets (sm_80, sm_90 + compute_90 PTX)
  FUSED_CKPT_CPU_SIMD=auto   auto | avx512 | avx2 | none: ISA of the CPU kernels'
                             at::vec::Vectorized<float>. auto picks the widest one the build
                             machine supports (the extension is built on the machine that runs
                             it, like -march=native); none is portable to any CPU.
"""
from __future__ import annotations

import importlib.util
import os
import shutil

from setuptools import find_namespace_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def _load_build_flags():
    """fused_ckpt/_build_flags.py by path: no torch, no fused_ckpt import at build time."""
    path = os.path.join(ROOT, "fused_ckpt", "_build_flags.py")
    spec = importlib.util.spec_from_file_location("_fused_ckpt_build_flags", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


flags = _load_build_flags()


class BuildPyWithSources(build_py):
    """Also copy csrc/ into the installed package as fused_ckpt/_csrc, so a non-editable
    install without the prebuilt extension can still compile it on first use."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # editable installs use the checkout's csrc/ directly
        dest = os.path.join(self.build_lib, "fused_ckpt", "_csrc")
        os.makedirs(dest, exist_ok=True)
        for name in flags.csrc_files(CSRC):
            shutil.copy2(os.path.join(CSRC, name), os.path.join(dest, name))


def _extensions():
    """(ext_modules, cmdclass entries); no extension when torch is not importable."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("fused_ckpt setup: torch is not importable here (pip's build isolation, or torch not "
              "installed yet): installing without the prebuilt csrc extension; fused_ckpt compiles "
              "it on first use (needs ninja and a C++ compiler). To build it now instead: install "
              "torch, then `pip install -e . --no-build-isolation`.")
        return [], {}

    os.environ.setdefault("MAX_JOBS", "2")
    with_cuda = flags.want_cuda(torch.version.cuda, CUDA_HOME)
    try:
        cxx_flags = flags.cxx_flags()
    except ValueError as e:
        raise SystemExit(str(e)) from None
    macros = [("FUSED_CKPT_WITH_CUDA", "1" if with_cuda else "0")]
    include_dirs = [CSRC]
    cpu_sources = [os.path.join("csrc", s) for s in flags.CPU_SOURCES]
    if with_cuda:
        ext = CUDAExtension(
            "fused_ckpt._C",
            cpu_sources + [os.path.join("csrc", s) for s in flags.CUDA_SOURCES],
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": flags.nvcc_flags()},
        )
    else:
        ext = CppExtension(
            "fused_ckpt._C",
            cpu_sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
        )
    print(f"fused_ckpt setup: building fused_ckpt._C with {'CPU + CUDA' if with_cuda else 'CPU'} kernels "
          f"(torch {torch.__version__}, MAX_JOBS={os.environ['MAX_JOBS']})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
cmdclass["build_py"] = BuildPyWithSources

setup(
    name="fused_ckpt",
    version="0.1.0",
    description="Fused activation-recompute (checkpointing) kernels for PyTorch",
    # Namespace-style: fused_ckpt.ops and fused_ckpt.kernels have no __init__.py, and
    # find_packages() would silently leave them out of a non-editable install.
    packages=find_namespace_packages(include=["fused_ckpt", "fused_ckpt.*"], exclude=["*.__pycache__"]),
    python_requires=">=3.10",
    # Install torch (and triton) yourself first, as README "Install" says: left to pip, this
    # requirement pulls the default PyPI torch (the CUDA build) into an empty environment.
    install_requires=["torch>=2.4", "triton>=3.0"],
    extras_require={"test": ["pytest", "numpy", "ninja", "transformers>=4.45", "matplotlib", "peft"]},
    entry_points={"console_scripts": ["fused-ckpt = fused_ckpt.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
