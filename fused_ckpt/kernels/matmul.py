"""A general GEMM with optional bias and in-place fp32 accumulation.

    C[M, N] (=, or += when ACCUMULATE) A[M, K] @ B[K, N] (+ bias[N])

Any strides (transposes are free: pass ``w.t()``). Serves the FFN's down-projection forward
and the dW1 / dW2 / dX GEMMs of its backward; ACCUMULATE lets the chunked backward add each
token chunk's dW into one fp32 buffer.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (ACC_REGS_GEMM, INTERPRET, autotune, dot_flags, launch, resource_pruner, size_bucket,
                      tl_dtype_ok)


def gemm_configs() -> list[triton.Config]:
    """Autotune space. Under the interpreter one mid-sized tile (tiles are numpy ops there:
    fewer, larger programs run faster). On GPU: the tiles that do well for large bf16
    GEMMs on A100/H100-class parts (128x128/128x256 with 3-4 stages) plus smaller ones for
    skinny shapes, and BLOCK_K = 16 tiles for fp32 inputs with IEEE dots (the only ones those
    keep: see ``select_tile_configs``)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
    cfgs = []
    for bm, bn, bk, stages, warps in (
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 32, 32, 5, 2),
        (128, 64, 16, 3, 8),
        (64, 64, 16, 3, 4),
    ):
        cfgs.append(
            triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_stages=stages, num_warps=warps)
        )
    return cfgs


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a 1-D program id onto (tile_m, tile_n), GROUP_M row tiles at a time (L2 reuse)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    tile_m = first_m + (pid % group) % size_m
    tile_n = (pid % group) // size_m
    return tile_m, tile_n


@triton.jit
def low_rank_tile(t_ptr, l_ptr, stride_tm, stride_tr, stride_ln, stride_lr, offs_m, offs_n, mask_m, mask_n, R,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr):
    """The [BLOCK_M, BLOCK_N] tile ``sum_r T[m, r] L[n, r]`` (fp32) of a rank-R product T L^T:
    T [M, R], L [N, R], any strides (a LoRA term ``t B^T``: L = B; ``g A``: L = A^T). A loop over
    R in steps of 16, the ``tl.dot`` minimum, with masked (zero) padding: any R >= 0 (0: zeros)."""
    offs_r = tl.arange(0, 16)
    t_ptrs = t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :] * stride_tr
    l_ptrs = l_ptr + offs_r[:, None] * stride_lr + offs_n[None, :] * stride_ln
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(0, tl.cdiv(R, 16)):
        r_left = R - r * 16
        t = tl.load(t_ptrs, mask=mask_m[:, None] & (offs_r[None, :] < r_left), other=0.0)
        l = tl.load(l_ptrs, mask=(offs_r[:, None] < r_left) & mask_n[None, :], other=0.0)
        if DOT_F32:
            t = t.to(tl.float32)
            l = l.to(tl.float32)
        acc = tl.dot(t, l, acc, input_precision=INPUT_PRECISION)
        t_ptrs += 16 * stride_tr
        l_ptrs += 16 * stride_lr
    return acc


def lora_flags(dtype: torch.dtype, x_dtype: torch.dtype) -> dict:
    """The kernels' LORA_F32 / LORA_PRECISION for LoRA factors of ``dtype`` in a kernel whose
    inputs are ``x_dtype``: ``dot_flags(dtype)``, except that float32 factors over 16-bit inputs
    (PEFT's default adapter dtype) take "tf32x3" on a GPU where ``dot_flags`` says IEEE: three
    TF32 tensor-core products, about fp32 accuracy, for a term rounded to 16 bits with the rest;
    the IEEE (FMA) dot keeps its operand tiles in registers next to the accumulators and spills
    (sm_90 bf16 builds: the fc2 GEMM's 128x64 tile on 4 warps 12 B, the recomputing gated
    backward's 64x64x64 on 4 warps 180 B; 0 and 72 B with tf32x3)."""
    f = dot_flags(dtype)
    prec = f["INPUT_PRECISION"]
    if dtype == torch.float32 and x_dtype != torch.float32 and prec == "ieee" and not INTERPRET:
        prec = "tf32x3"
    return {"LORA_F32": f["DOT_F32"], "LORA_PRECISION": prec}


NO_LORA_FLAGS = {"LORA_F32": False, "LORA_PRECISION": None}


def _gemm_acc_tiles(kw) -> int:
    """Accumulator tiles the register budget counts: one, two with a LoRA term (its fp32 IEEE dot
    over 16-bit inputs keeps operand tiles in registers next to the accumulator: the sm_90 bf16
    build of 128x256 on 8 warps spills 380 B with triton 3.9, 128x128 does not)."""
    return 2 if kw.get("HAS_LORA") else 1


def _gemm_stage_bytes(cfg, kw, elem) -> int:
    return (cfg["BLOCK_M"] * cfg["BLOCK_K"] + cfg["BLOCK_K"] * cfg["BLOCK_N"]) * elem


@autotune(configs=gemm_configs(), key=["M_BUCKET", "N", "K_BUCKET", "HAS_BIAS", "ACCUMULATE", "HAS_LORA"],
          restore_value=["c_ptr"],
          prune_configs_by={"early_config_prune": resource_pruner(
              _gemm_acc_tiles, _gemm_stage_bytes, "a_ptr", ACC_REGS_GEMM)})
@triton.jit(do_not_specialize=["M_BUCKET", "K_BUCKET"])
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, lt_ptr, lb_ptr,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    stride_ltm, stride_ltr, stride_lbn, stride_lbr,
    M, N, K, M_BUCKET, K_BUCKET, R, lora_scale,
    HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_LORA: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    LORA_F32: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """a_ptr: [M, K], b_ptr: [K, N], c_ptr: [M, N], any strides; bias_ptr: [N] contiguous.
    M_BUCKET, K_BUCKET: ``size_bucket`` of M and K, the autotune key in place of the sizes that
    carry the token count (M for Y = H W2^T and dX, K for dW1 and dW2); unused in the body.
    HAS_LORA: C also gets ``lora_scale * T L^T`` (a LoRA adapter's term; lt_ptr: T [M, R],
    lb_ptr: L = the adapter's B [N, R], any strides, read only when HAS_LORA), formed in the
    fp32 accumulator before the K loop (LORA_F32 / LORA_PRECISION: ``dot_flags`` of T's dtype)."""
    pid = tl.program_id(0).to(tl.int64)
    tile_m, tile_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    if HAS_LORA:
        acc = low_rank_tile(lt_ptr, lb_ptr, stride_ltm, stride_ltr, stride_lbn, stride_lbr, offs_m, offs_n,
                            mask_m, mask_n, R, BLOCK_M, BLOCK_N, LORA_F32, LORA_PRECISION) * lora_scale
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    mask = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def gemm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, *,
         out: torch.Tensor | None = None, accumulate: bool = False,
         out_dtype: torch.dtype | None = None, lora: tuple | None = None) -> torch.Tensor:
    """``out (+)= a @ b (+ bias)`` with fp32 accumulation. a: [M, K], b: [K, N]. ``lora``:
    (t [M, r], lb [N, r], scaling): also ``+ scaling * t lb^T`` in the same accumulator (t and lb
    in one dtype: fp32, fp16 or bf16), rounded once with the rest."""
    M, K = a.shape
    K2, N = b.shape
    assert K == K2 and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    if out is None:
        assert not accumulate
        out = torch.empty((M, N), device=a.device, dtype=out_dtype or a.dtype)
    assert out.shape == (M, N), (out.shape, M, N)
    if M == 0 or N == 0:
        return out
    if lora is not None:
        assert lora[0].shape == (M, lora[1].shape[1]) and lora[1].shape[0] == N, (lora[0].shape, lora[1].shape)
        assert lora[0].dtype == lora[1].dtype and tl_dtype_ok(lora[0]), (lora[0].dtype, lora[1].dtype)
    if K == 0 and lora is None:
        if not accumulate:
            out.zero_()
            if bias is not None:
                out += bias
        elif bias is not None:
            out += bias
        return out
    if bias is not None:
        bias = bias.contiguous()
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    lt, lb, scale = lora if lora is not None else (a, a, 0.0)
    launch(_gemm_kernel, grid,
        a, b, out, bias if bias is not None else a, lt, lb,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        lt.stride(0), lt.stride(1), lb.stride(0), lb.stride(1),
        M, N, K, size_bucket(M), size_bucket(K), lb.shape[1] if lora is not None else 0, float(scale),
        HAS_BIAS=bias is not None, ACCUMULATE=accumulate, HAS_LORA=lora is not None, **dot_flags(a.dtype),
        **(lora_flags(lt.dtype, a.dtype) if lora is not None else NO_LORA_FLAGS),
    )
    return out
