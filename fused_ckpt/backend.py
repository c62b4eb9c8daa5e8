"""Backend choice: which implementation runs an op for given tensors.

=========  ====================================================================
backend    meaning
=========  ====================================================================
"auto"     float64 inputs: "aten". Otherwise CUDA tensors: "triton"; CPU tensors:
           "triton" when TRITON_INTERPRET=1 (the Triton interpreter runs the real
           kernels with numpy), else "aten".
"triton"   the fused Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1);
           float32/float16/bfloat16 only (float64 raises a TypeError: the kernels
           accumulate in fp32).
"aten"     torch GEMMs (cuBLAS / CPU BLAS) plus the fused elementwise ops of the
           csrc extension; same recompute contract, same saved tensors; float64
           computed in float64 on every op.
=========  ====================================================================

The environment variable ``FUSED_CKPT_BACKEND`` (one of the names above) replaces
``"auto"``; an explicit ``backend=`` argument wins over it.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

BACKENDS = ("auto", "triton", "aten")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_backend_dtype(backend: str, dtype: torch.dtype, what: str = "inputs") -> None:
    """TypeError for float64 on the Triton backend (its kernels accumulate and store in fp32
    precision; float64 outputs would be fp32-accurate at best)."""
    if backend == "triton" and dtype == torch.float64:
        raise TypeError(f"backend='triton' does not support {what} of dtype torch.float64 (the kernels "
                        "compute in float32); use backend='aten', which computes float64 in float64 "
                        "(backend='auto' picks it for float64)")


def resolve_backend(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """The backend that runs an op on tensors of ``device`` and ``dtype`` (see the table)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "auto":
        env = os.environ.get("FUSED_CKPT_BACKEND", "auto")
        if env not in BACKENDS:
            raise ValueError(f"FUSED_CKPT_BACKEND={env!r} is not one of {BACKENDS}")
        backend = env
    if backend == "auto":
        if dtype == torch.float64:
            return "aten"
        return "triton" if (device.type == "cuda" or _interpreting()) else "aten"
    if dtype is not None:  # a dtype the backend refuses anywhere, before the device question
        check_backend_dtype(backend, dtype)
    if backend == "triton" and device.type != "cuda" and not _interpreting():
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, got tensors on {device}; set TRITON_INTERPRET=1 "
            "(before triton is imported) to run the Triton kernels on CPU, or use backend='aten'"
        )
    return backend
