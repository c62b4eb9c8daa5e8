"""Launch-side helpers shared by the kernel launchers (no kernels here)."""
from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# FUSED_CKPT_AUTOTUNE=0: every autotuned kernel keeps only the first config that survives its
# pruning, so each kernel variant compiles once instead of once per candidate (correctness runs
# on a GPU, e.g. the GPU tests of benchmarks/gpu_check.sh); benchmarks keep autotuning.
AUTOTUNE = os.environ.get("FUSED_CKPT_AUTOTUNE", "1") != "0"


def autotune_candidates(kept: list) -> list:
    """What an ``early_config_prune`` returns: its survivors, or only the first of them when
    FUSED_CKPT_AUTOTUNE=0."""
    return kept if AUTOTUNE else kept[:1]


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


# ----------------------------------------------------------------------------- config pruning
# Budgets behind the autotune pruning below, checked offline with tools/aot_compile.py
# (ptxas -v for sm_90a): above these, configs spill registers or exceed shared memory.
SMEM_BYTES = 227 * 1024  # H100/H200 opt-in shared memory per block
ACC_REGS_GEMM = 128  # fp32 accumulator registers per thread for a plain GEMM (128x256 tile, 8 warps)
ACC_REGS_FUSED = 96  # ... for kernels with a transcendental epilogue (activation and its derivative)


def _elem_size(named_args: dict, name: str) -> int:
    t = named_args.get(name)
    return t.element_size() if hasattr(t, "element_size") else 2


def resource_pruner(acc_tiles, stage_bytes, ptr_name: str, acc_budget: int):
    """An ``early_config_prune`` that drops configs whose fp32 accumulators exceed
    ``acc_budget`` registers per thread or whose pipelined tiles exceed shared memory.

    acc_tiles(kw) -> how many BLOCK_M x BLOCK_N fp32 accumulators the kernel holds;
    stage_bytes(cfg_kw, kw, elem) -> bytes of operand tiles loaded per pipeline stage.
    Under the interpreter (one config) nothing is pruned; if every config is over budget the
    smallest survives, so autotuning always has a candidate."""

    def prune(configs, named_args, **kwargs):
        if INTERPRET or len(configs) <= 1:
            return configs
        elem = _elem_size(named_args, ptr_name)
        budget = acc_budget if elem <= 2 else acc_budget // 2  # fp32 operand tiles need registers too
        kept = []
        for c in configs:
            kw = c.kwargs
            threads = 32 * c.num_warps
            regs = acc_tiles(kwargs) * kw["BLOCK_M"] * kw["BLOCK_N"] // threads
            smem = c.num_stages * stage_bytes(kw, kwargs, elem)
            if regs <= budget and smem <= SMEM_BYTES:
                kept.append(c)
        return autotune_candidates(kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])])

    return prune


def fused_tile_configs() -> list:
    """Candidate tiles for the fused FFN kernels (pruned per launch by ``resource_pruner``)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for bm, bn, bk, s, w in (
            (128, 256, 64, 3, 8),
            (128, 128, 64, 3, 8),
            (128, 128, 64, 4, 8),
            (128, 64, 64, 3, 8),
            (128, 64, 64, 4, 4),
            (64, 128, 64, 3, 8),
            (64, 128, 64, 4, 4),
            (64, 64, 64, 4, 4),
            (64, 64, 32, 5, 4),
        )
    ]
