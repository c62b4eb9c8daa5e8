"""Flash attention backward (FlashAttention-2 style): probabilities recomputed from Q, K, LSE.

    delta = rowsum(dO * O)                                   preprocess kernel, fp32 [B, H, S_q]
    P     = exp(scale * Q K^T - LSE)                          recomputed per tile, never stored
    dV    = P^T dO,   dP = dO V^T,   dS = P * (dP - delta)
    dK    = scale * dS^T Q,          dQ = scale * dS K

Two kernels, no atomics, so results are bitwise reproducible:
  * ``_flash_bwd_dkdv_kernel``: one program per (key block, kv head, batch); one flat loop
    over (query head of its GQA group, query block that sees the key block), so dK/dV of a
    shared kv head are summed in registers. (Flat: a head loop around a block loop made the
    sm_90 build spill its dK/dV accumulators.)
  * ``_flash_bwd_dq_kernel``: one program per (query block, head, batch), looping over the
    key blocks the forward visited.
A query with LSE = -inf (it saw no key) gets P = 0 everywhere: its LSE is read as +inf.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, dot_flags
from .flash_attn_fwd import (LOG2E, _kv_stages, _tile_offsets, _visible, check_head_dim, kpm_arg,
                             prune_by_head_dim, seq_bucket, tile_safe)

PRE_BLOCK_M = 64  # delta preprocess: a 64-row tile of dO*O is 16-64 KiB of loads at D=64-256


def dkdv_configs() -> list[triton.Config]:
    """BLOCK_N keys stay resident (K, V, dK, dV: four [BLOCK_N, D] tiles) while BLOCK_M query
    rows stream past, so BLOCK_N is the larger side, as in FlashAttention-2. Mostly 8 warps:
    compiled for sm_90 (triton 3.6), these tiles keep the four resident tiles in registers
    without spilling at D=64 (D=128: under 100 bytes), where 4-warp versions spill."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w)
        for bm, bn, s, w in (
            (64, 128, 2, 8),
            (32, 128, 3, 8),
            (16, 128, 3, 8),
            (32, 64, 3, 8),
            (32, 64, 3, 4),
            (32, 32, 2, 4),
        )
    ]


def dq_configs() -> list[triton.Config]:
    """BLOCK_M query rows stay resident (Q, dO, dQ) while key blocks stream past."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w)
        for bm, bn, s, w in (
            (128, 64, 2, 8),
            (128, 32, 3, 8),
            (64, 64, 3, 4),
            (64, 32, 3, 4),
            (32, 32, 2, 4),
            (64, 16, 2, 4),
        )
    ]


# --------------------------------------------------------------------------- preprocess
@triton.jit
def _flash_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_deltab, stride_deltah, stride_deltas,
    S_q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """o_ptr, do_ptr: [B, S_q, H, D]; delta_ptr: [B, H, S_q] fp32. Grid (cdiv(S_q, BLOCK_M), H, B)."""
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    m64 = m0.to(tl.int64)
    in_q = (m0 + tl.arange(0, BLOCK_M)) < S_q
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + m64 * stride_os
                + _tile_offsets(stride_os, stride_od, BLOCK_M, HEAD_DIM), mask=in_q[:, None], other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + m64 * stride_dos
                 + _tile_offsets(stride_dos, stride_dod, BLOCK_M, HEAD_DIM), mask=in_q[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + b * stride_deltab + h * stride_deltah + m64 * stride_deltas
             + tl.arange(0, BLOCK_M) * stride_deltas, delta, mask=in_q)


@triton.jit
def _load_lse(lse_base, stride_ls, offs_m, S_q):
    """LSE with +inf for rows without any key and for rows past S_q, so that P = 0 there."""
    lse = tl.load(lse_base + offs_m * stride_ls, mask=offs_m < S_q, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse)


# --------------------------------------------------------------------------- dK / dV
@triton.jit
def _dkdv_inner(
    dk, dv, k, v, kv_keep, q_head0, do_head0, lse_head0, delta_head0, q_tile, do_tile,
    stride_qh, stride_qs, stride_doh, stride_dos, stride_lh, stride_ls,
    offs_n, first_m, n_blocks, GROUP, S_q, S_kv, DIAG, sm_scale,
    MASKED: tl.constexpr, HAS_KPM: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Accumulate into dk, dv the query blocks first_m + i * BLOCK_M, i < n_blocks, of each of
    the GROUP query heads sharing this kv head (one flat loop over (head, block): a nested
    head loop around the block loop costs registers). MASKED: apply the causal mask (blocks
    on the diagonal). Rows past S_q need no mask: they read LSE = +inf, so P = 0."""
    for it in range(0, GROUP * n_blocks):
        g = it // n_blocks
        start_m = first_m + (it - g * n_blocks) * BLOCK_M
        g64 = tl.cast(g, tl.int64)
        m64 = tl.cast(start_m, tl.int64)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        in_q = offs_m < S_q
        q = tl.load(q_head0 + g64 * stride_qh + m64 * stride_qs + q_tile, mask=in_q[:, None], other=0.0)
        do = tl.load(do_head0 + g64 * stride_doh + m64 * stride_dos + do_tile, mask=in_q[:, None], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = _load_lse(lse_head0 + g64 * stride_lh, stride_ls, offs_m, S_q)
        delta = tl.load(delta_head0 + g64 * stride_lh + offs_m * stride_ls, mask=in_q, other=0.0)
        sT = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION)  # [BLOCK_N, BLOCK_M]
        # s * scale - lse first (one FMA on GPU), base 2 after: see the forward kernel
        pT = tl.math.exp2((sT * sm_scale - lse[None, :]) * LOG2E)
        if MASKED or HAS_KPM:
            keep = _visible(offs_m[None, :], offs_n[:, None], kv_keep[:, None], S_kv, DIAG, MASKED, HAS_KPM)
            pT = tl.where(keep, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=INPUT_PRECISION)
    return dk, dv


@triton.autotune(configs=dkdv_configs(), key=["Q_BUCKET", "KV_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_KPM"],
                 prune_configs_by={"early_config_prune": prune_by_head_dim(64 * 128)})
@triton.jit
def _flash_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, kpm_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_kpmb, stride_kpms,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_lb, stride_lh, stride_ls,
    stride_dkb, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvs, stride_dvh, stride_dvd,
    GROUP, S_q, S_kv, Q_BUCKET, KV_BUCKET, sm_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """q_ptr, do_ptr: [B, S_q, H, D]; k_ptr, v_ptr, dk_ptr, dv_ptr: [B, S_kv, H_kv, D];
    kpm_ptr: [B, S_kv] uint8 (read only when HAS_KPM); lse_ptr, delta_ptr: [B, H, S_q] fp32
    (delta shares lse's strides). Any strides. Grid: (cdiv(S_kv, BLOCK_N), H_kv, B)."""
    n0 = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    n64 = n0.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    in_kv = offs_n < S_kv
    k = tl.load(k_ptr + b * stride_kb + hk * stride_kh + n64 * stride_ks
                + _tile_offsets(stride_ks, stride_kd, BLOCK_N, HEAD_DIM), mask=in_kv[:, None], other=0.0)
    v = tl.load(v_ptr + b * stride_vb + hk * stride_vh + n64 * stride_vs
                + _tile_offsets(stride_vs, stride_vd, BLOCK_N, HEAD_DIM), mask=in_kv[:, None], other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    kv_keep = in_kv
    if HAS_KPM:
        kv_keep = tl.load(kpm_ptr + b * stride_kpmb + offs_n * stride_kpms, mask=in_kv, other=0) != 0
    q_tile = _tile_offsets(stride_qs, stride_qd, BLOCK_M, HEAD_DIM)
    do_tile = _tile_offsets(stride_dos, stride_dod, BLOCK_M, HEAD_DIM)
    h0 = hk * GROUP  # first query head of the group
    q_head0 = q_ptr + b * stride_qb + h0 * stride_qh
    do_head0 = do_ptr + b * stride_dob + h0 * stride_doh
    lse_head0 = lse_ptr + b * stride_lb + h0 * stride_lh
    delta_head0 = delta_ptr + b * stride_lb + h0 * stride_lh

    diag = S_kv - S_q
    # query blocks [lo, mid) lie on the causal diagonal (masked); [mid, S_q) see every key of
    # this block. Keys past S_kv need no mask either: their dK/dV rows are never stored.
    end = tl.cdiv(S_q, BLOCK_M) * BLOCK_M
    mid = 0
    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    if CAUSAL:
        lo = tl.maximum(n0 - diag, 0) // BLOCK_M * BLOCK_M  # first query that sees key n0
        # queries >= n0 + BLOCK_N - 1 - diag see every key of the block
        mid = tl.minimum(tl.maximum((n0 + BLOCK_N - 1 - diag + BLOCK_M - 1) // BLOCK_M * BLOCK_M, lo), end)
        dk, dv = _dkdv_inner(
            dk, dv, k, v, kv_keep, q_head0, do_head0, lse_head0, delta_head0, q_tile, do_tile,
            stride_qh, stride_qs, stride_doh, stride_dos, stride_lh, stride_ls,
            offs_n, lo, (mid - lo) // BLOCK_M, GROUP, S_q, S_kv, diag, sm_scale,
            True, HAS_KPM, DOT_F32, INPUT_PRECISION, BLOCK_M)
    dk, dv = _dkdv_inner(
        dk, dv, k, v, kv_keep, q_head0, do_head0, lse_head0, delta_head0, q_tile, do_tile,
        stride_qh, stride_qs, stride_doh, stride_dos, stride_lh, stride_ls,
        offs_n, mid, (end - mid) // BLOCK_M, GROUP, S_q, S_kv, diag, sm_scale,
        False, HAS_KPM, DOT_F32, INPUT_PRECISION, BLOCK_M)

    dk = dk * sm_scale
    tl.store(dk_ptr + b * stride_dkb + hk * stride_dkh + n64 * stride_dks
             + _tile_offsets(stride_dks, stride_dkd, BLOCK_N, HEAD_DIM),
             dk.to(dk_ptr.dtype.element_ty), mask=in_kv[:, None])
    tl.store(dv_ptr + b * stride_dvb + hk * stride_dvh + n64 * stride_dvs
             + _tile_offsets(stride_dvs, stride_dvd, BLOCK_N, HEAD_DIM),
             dv.to(dv_ptr.dtype.element_ty), mask=in_kv[:, None])


# --------------------------------------------------------------------------- dQ
@triton.jit
def _dq_inner(
    dq, q, do, lse, delta, k_base, v_base, kpm_base, k_tile, v_tile,
    stride_ks, stride_vs, stride_kpms,
    offs_m, lo, hi, S_kv, DIAG, sm_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        in_kv = offs_n < S_kv
        n64 = tl.cast(start_n, tl.int64)
        k = tl.load(k_base + n64 * stride_ks + k_tile, mask=in_kv[:, None], other=0.0)
        v = tl.load(v_base + n64 * stride_vs + v_tile, mask=in_kv[:, None], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        p = tl.math.exp2((s * sm_scale - lse[:, None]) * LOG2E)
        if MASKED or HAS_KPM:
            kv_keep = in_kv
            if HAS_KPM:
                kv_keep = tl.load(kpm_base + offs_n * stride_kpms, mask=in_kv, other=0) != 0
            keep = _visible(offs_m[:, None], offs_n[None, :], kv_keep[None, :], S_kv, DIAG,
                            CAUSAL and MASKED, HAS_KPM)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@triton.autotune(configs=dq_configs(), key=["Q_BUCKET", "KV_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_KPM"],
                 prune_configs_by={"early_config_prune": prune_by_head_dim(128 * 64)})
@triton.jit
def _flash_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, kpm_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_kpmb, stride_kpms,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_lb, stride_lh, stride_ls,
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    GROUP, S_q, S_kv, Q_BUCKET, KV_BUCKET, sm_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Pointers as in the dK/dV kernel; dq_ptr: [B, S_q, H, D]. Grid: (cdiv(S_q, BLOCK_M), H, B)."""
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    m64 = m0.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    in_q = offs_m < S_q
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + m64 * stride_qs
                + _tile_offsets(stride_qs, stride_qd, BLOCK_M, HEAD_DIM), mask=in_q[:, None], other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + m64 * stride_dos
                 + _tile_offsets(stride_dos, stride_dod, BLOCK_M, HEAD_DIM), mask=in_q[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = _load_lse(lse_ptr + b * stride_lb + h * stride_lh, stride_ls, offs_m, S_q)
    delta = tl.load(delta_ptr + b * stride_lb + h * stride_lh + offs_m * stride_ls, mask=in_q, other=0.0)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    kpm_base = kpm_ptr + b * stride_kpmb
    k_tile = _tile_offsets(stride_ks, stride_kd, BLOCK_N, HEAD_DIM)
    v_tile = _tile_offsets(stride_vs, stride_vd, BLOCK_N, HEAD_DIM)

    diag = S_kv - S_q
    full_hi, hi = _kv_stages(m0, S_q, S_kv, CAUSAL, BLOCK_M, BLOCK_N)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, kpm_base, k_tile, v_tile,
                   stride_ks, stride_vs, stride_kpms, offs_m, 0, full_hi, S_kv, diag, sm_scale,
                   False, CAUSAL, HAS_KPM, DOT_F32, INPUT_PRECISION, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, kpm_base, k_tile, v_tile,
                   stride_ks, stride_vs, stride_kpms, offs_m, full_hi, hi, S_kv, diag, sm_scale,
                   True, CAUSAL, HAS_KPM, DOT_F32, INPUT_PRECISION, BLOCK_N)
    dq = dq * sm_scale
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + m64 * stride_dqs
             + _tile_offsets(stride_dqs, stride_dqd, BLOCK_M, HEAD_DIM),
             dq.to(dq_ptr.dtype.element_ty), mask=in_q[:, None])


# --------------------------------------------------------------------------- launcher
def flash_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   o: torch.Tensor, lse: torch.Tensor, kpm: torch.Tensor | None, causal: bool,
                   scale: float, need_dq: bool = True, need_dkdv: bool = True
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """do, o: [B, S_q, H, D]; q: [B, S_q, H, D]; k, v: [B, S_kv, H_kv, D]; lse: [B, H, S_q]
    fp32; kpm: [B, S_kv] bool or None. Any strides. Returns (dq, dk, dv), contiguous, in the
    inputs' dtype; None for those not asked for."""
    B, S_q, H, D = q.shape
    S_kv, H_kv = k.shape[1], k.shape[2]
    check_head_dim(D)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format) if need_dq else None
    dk = torch.empty_like(k, memory_format=torch.contiguous_format) if need_dkdv else None
    dv = torch.empty_like(v, memory_format=torch.contiguous_format) if need_dkdv else None
    if q.numel() == 0 or k.numel() == 0:  # no query or no key: every gradient is zero
        for t in (dq, dk, dv):
            if t is not None:
                t.zero_()
        return dq, dk, dv
    q, k, v, o, do = (tile_safe(t) for t in (q, k, v, o, do))
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    _flash_bwd_preprocess_kernel[(triton.cdiv(S_q, PRE_BLOCK_M), H, B)](
        o, do, delta, *o.stride(), *do.stride(), *delta.stride(), S_q,
        HEAD_DIM=D, BLOCK_M=PRE_BLOCK_M,
    )
    kk, kpm_strides = kpm_arg(kpm, lse)
    common = dict(HEAD_DIM=D, CAUSAL=causal, HAS_KPM=kpm is not None, **dot_flags(q.dtype))
    sizes = (H // H_kv, S_q, S_kv, seq_bucket(S_q), seq_bucket(S_kv), scale)
    if need_dkdv:
        _flash_bwd_dkdv_kernel[lambda meta: (triton.cdiv(S_kv, meta["BLOCK_N"]), H_kv, B)](
            q, k, v, kk, do, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *kpm_strides, *do.stride(), *lse.stride(),
            *dk.stride(), *dv.stride(), *sizes, **common,
        )
    if need_dq:
        _flash_bwd_dq_kernel[lambda meta: (triton.cdiv(S_q, meta["BLOCK_M"]), H, B)](
            q, k, v, kk, do, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *kpm_strides, *do.stride(), *lse.stride(),
            *dq.stride(), *sizes, **common,
        )
    return dq, dk, dv


def aot_specs(B: int = 2, S: int = 4096, H: int = 32, H_kv: int = 8) -> list:
    """Representative launches of the backward kernels for ``tools/aot_compile.py``."""
    from .flash_attn_fwd import attn_ints

    specs = []
    for D in (64, 128):
        ints = attn_ints(B, S, H, H_kv, D)
        pre = dict(ints, stride_deltab=H * S, stride_deltah=S, stride_deltas=1)
        specs.append((_flash_bwd_preprocess_kernel, "bf16", dict(HEAD_DIM=D, BLOCK_M=PRE_BLOCK_M), pre))
        for causal, kpm in ((True, False), (False, True)):
            consts = dict(HEAD_DIM=D, CAUSAL=causal, HAS_KPM=kpm, DOT_F32=False, INPUT_PRECISION=None)
            specs.append((_flash_bwd_dkdv_kernel, "bf16", consts, ints))
            specs.append((_flash_bwd_dq_kernel, "bf16", consts, ints))
    return specs
