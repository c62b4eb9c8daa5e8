"""Backend choice: which implementation runs an op for given tensors.

=========  ====================================================================
backend    meaning
=========  ====================================================================
"auto"     CUDA tensors: "triton". CPU tensors: "triton" when TRITON_INTERPRET=1
           (the Triton interpreter runs the real kernels with numpy), else "aten".
"triton"   the fused Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1).
"aten"     torch GEMMs (cuBLAS / CPU BLAS) plus the fused elementwise ops of the
           csrc extension; same recompute contract, same saved tensors.
=========  ====================================================================

The environment variable ``FUSED_CKPT_BACKEND`` (one of the names above) replaces
``"auto"``; an explicit ``backend=`` argument wins over it.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "aten")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        env = os.environ.get("FUSED_CKPT_BACKEND", "auto")
        if env not in BACKENDS:
            raise ValueError(f"FUSED_CKPT_BACKEND={env!r} is not one of {BACKENDS}")
        backend = env
    if backend == "auto":
        return "triton" if (device.type == "cuda" or _interpreting()) else "aten"
    if backend == "triton" and device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, got tensors on {device}; set TRITON_INTERPRET=1 "
            "(before triton is imported) to run the Triton kernels on CPU, or use backend='aten'"
        )
    return backend
