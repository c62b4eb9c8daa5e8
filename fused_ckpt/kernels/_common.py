"""Launch-side helpers shared by the kernel launchers (no kernels here)."""
from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_flags(dtype: torch.dtype) -> dict:
    """Constexprs that pin down how ``tl.dot`` multiplies operands of ``dtype``.

    DOT_F32: upcast operands to fp32 before ``tl.dot``. Only under the interpreter for bf16,
        whose ``tl.dot`` on bf16 operands returns garbage in triton 3.9; the products of
        bf16 values are exact in fp32, so results are the bf16 GEMM with fp32 accumulation.
    INPUT_PRECISION: fp32 operands use IEEE fp32 unless the user allowed TF32 for matmuls
        (``torch.backends.cuda.matmul.allow_tf32``), mirroring what cuBLAS does for torch.
    """
    dot_f32 = INTERPRET and dtype == torch.bfloat16
    if dtype == torch.float32:
        prec = "tf32" if (not INTERPRET and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    elif dot_f32:
        prec = "ieee"
    else:
        prec = None
    return {"DOT_F32": dot_f32, "INPUT_PRECISION": prec}


def tl_dtype_ok(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float32, torch.float16, torch.bfloat16)


def check_device(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"the Triton backend needs CUDA tensors ({what} is on {t.device}); set "
            "TRITON_INTERPRET=1 before importing triton to run the kernels on CPU, or use backend='aten'"
        )


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)
