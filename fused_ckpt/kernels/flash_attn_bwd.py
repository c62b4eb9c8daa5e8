"""Flash attention backward (FlashAttention-2 style): probabilities recomputed from Q, K, LSE.

    delta = rowsum(dO * O)                                   preprocess kernel, fp32 [B, H, S_q]
    P     = exp(scale * Q K^T - LSE)                          recomputed per tile, never stored
    dV    = P^T dO,   dP = dO V^T,   dS = P * (dP - delta)
    dK    = scale * dS^T Q,          dQ = scale * dS K

Kernels:
  * ``_flash_bwd_dkdv_kernel``: one program per (key block, kv head, batch); one flat loop
    over (query head of its GQA group, query block that sees the key block), so dK/dV of a
    shared kv head are summed in registers. (Flat: a head loop around a block loop made the
    sm_90 build spill its dK/dV accumulators.) With ATOMIC_DQ it also adds each tile's
    scale * dS K to an fp32 dQ buffer [B, S_q, H, D] with atomics (a program adds to the dQ
    rows of each query head of its group that see its keys), cast to the inputs' dtype after.
  * ``_flash_bwd_dq_kernel``: one program per (query block, head, batch), looping over the
    key blocks the forward visited.

Two paths (``single_pass`` decides):
  * single pass (the default when dq, dk and dv are all wanted): the dK/dV kernel with
    ATOMIC_DQ. S = Q K^T and dP = dO V^T are computed once per tile: 5 GEMMs per visible
    (query, key) pair, 2.5x the forward's FLOPs, as FlashAttention-2. The order in which
    the atomics land varies from run to run on a GPU, so dq is not bitwise reproducible
    (dk and dv are); FlashAttention's backward is non-deterministic by default too.
  * deterministic (``torch.use_deterministic_algorithms(True)``, ``warn_only`` or not): both
    kernels, no atomics, bitwise reproducible; S and dP are computed by both kernels (7
    GEMMs per pair, 3.5x the forward). Also taken when only dq or only dk/dv is wanted
    (then one kernel runs: 3 GEMMs per pair for dq alone, 4 for dk/dv alone).
A query with LSE = -inf (it saw no key) gets P = 0 everywhere: its LSE is read as +inf.

Forward options (constexpr flags, as in the forward kernel):
  * HAS_SOFTCAP: P = exp(C - LSE) with C = softcap * tanh(scale * Q K^T / softcap), recomputed
    from the raw scores; dS gets the derivative of the cap: dS = P * (dP - delta) * (1 - tanh^2).
  * HAS_WINDOW: the forward's sliding window; query blocks right of the window are skipped.
  * HAS_DROPOUT (FlashAttention-2's formulas, keep mask Z regenerated from the same Philox
    counters): dV = (P * Z / (1 - p))^T dO, dP = (dO V^T) * Z / (1 - p), dS = P * (dP - delta),
    delta = rowsum(dO * O) with O the dropped output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, autotune, autotune_candidates, dot_flags, launch
from .flash_attn_fwd import (LOG2E, MAX_ROWS_256, _dropout_keep, _kv_stages, _softcap, _tile_offsets, _visible,
                             _window_stage, check_head_dim, kpm_arg, option_args, prune_by_head_dim, seq_bucket,
                             tile_safe, tiles_within)

PRE_BLOCK_M = 64  # delta preprocess: a 64-row tile of dO*O is 16-64 KiB of loads at D=64-256


def dkdv_configs() -> list[triton.Config]:
    """BLOCK_N keys stay resident (K, V, dK, dV: four [BLOCK_N, D] tiles) while BLOCK_M query
    rows stream past, so BLOCK_N is the larger side, as in FlashAttention-2. Mostly 8 warps:
    compiled for sm_90 (triton 3.6 and 3.9), these tiles keep the four resident tiles in
    registers where 4-warp versions spill. ``_prune_dkdv`` picks those that build without
    spills for each head dim and path (the single pass also holds a dQ tile)."""
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
            (32, 32, 3, 8),
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
# Registers per thread a single-pass dK/dV program may need, estimated as 32-bit words of its
# tiles: dK, dV [BLOCK_N, D] and dQ [BLOCK_M, D] fp32, S^T and dP^T [BLOCK_N, BLOCK_M] fp32,
# K, V [BLOCK_N, D] and Q, dO [BLOCK_M, D] in the inputs' dtype. Compiled for sm_90 (ptxas -v,
# triton 3.6 and 3.9, 16-bit inputs), every surviving config up to 256 builds without spills
# (32x128 on 8 warps at head_dim 128: 255 registers); the next ones, 272 (32x64 on 8 warps at
# head_dim 256) and 288 (32x64 on 4 warps at 128), spill.
ATOMIC_DQ_REGS = 256
# With softcap or dropout on, the estimate counts their tiles and both paths must stay within
# this: bf16 builds at head_dim 64 with every option (triton 3.9) spilled 60 B (deterministic,
# estimate 240) and 124 B (single pass, 256) in 64x128 on 8 warps; every config estimated at
# <= 192 built clean (at most 240 registers) except two single-pass builds with every option
# on: 32x32 on 4 warps at head_dim 128 (8 B; 32x64 on 8 warps, listed first, is clean) and 32x32
# on 8 warps at head_dim 256 (32 B; the one tile kept there; the deterministic path is clean).
# With triton 3.6 the 32x64 8-warp build at head_dim 128 spills 16 B (deterministic) and 20 B
# (single pass) with every option on (3.9: clean at 255 registers); not pruned for 3.6.
OPTIONS_REGS = 224


def _atomic_dq_regs(cfg: triton.Config, head_dim: int, elem: int, options: int = 0, atomic: bool = True) -> int:
    """The estimate above; ``options``: how many of softcap (the tanh tile) and dropout (the
    keep-mask tile) are on, each one more [BLOCK_N, BLOCK_M] tile; not ``atomic``: without
    the dQ tile."""
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    words = (2 * bn * head_dim + bm * head_dim * atomic + (2 + options) * bn * bm
             + (2 * bn + 2 * bm) * head_dim * elem // 4)
    return words // (32 * cfg.num_warps)


def _dkdv_fits(cfg: triton.Config, head_dim: int, elem: int, atomic: bool, options: int = 0) -> bool:
    """Register rules on top of the tile-size pruning, from sm_90 builds (ptxas -v, triton
    3.6 and 3.9, 16-bit inputs; fp32 inputs, whose IEEE dots skip the tensor cores, spill in
    every config of both paths):
      * 4 warps holding 128 fp32 registers of dK and dV per thread (32x64 tiles at head_dim
        128) sit at the 255-register limit: triton 3.6 spills (both paths);
      * 32x32 tiles on 8 warps are kept for head_dim 256 only, where they are the one tile
        that builds without spills (both paths; triton 3.9, bf16: 180 registers deterministic,
        250 single pass; 16x128 spills 3 KB and 32x64 264 B) and so the only one kept there;
        their 32-row dots use mma.sync, not wgmma. At smaller head dims ptxas gives some of
        those builds too few registers, and they spill a few bytes;
      * the single pass (ATOMIC_DQ) keeps configs within ATOMIC_DQ_REGS;
      * with softcap or dropout (``options`` > 0) both paths keep configs within OPTIONS_REGS,
        counting their extra tiles (bf16 at head_dim 128 with both: 32x128 on 8 warps spilled
        20 B deterministic and 120 B single pass, triton 3.9)."""
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    if cfg.num_warps == 4 and 2 * bn * head_dim // (32 * cfg.num_warps) >= 128:
        return False
    if cfg.num_warps == 8 and bm * bn <= 32 * 32 and head_dim < 256:
        return False
    if head_dim >= 256 and bm * bn > 32 * 32:  # 16x128: 3 KB of spills, 32x64: 264 B (deterministic)
        return False
    if options:
        return _atomic_dq_regs(cfg, head_dim, elem, options, atomic) <= OPTIONS_REGS
    return not atomic or _atomic_dq_regs(cfg, head_dim, elem) <= ATOMIC_DQ_REGS


def _prune_dkdv(configs, named_args, **kwargs):
    """early_config_prune of the dK/dV kernel: tiles by head dim (as the other attention
    kernels), then ``_dkdv_fits``; if nothing fits, the config with the fewest estimated
    registers."""
    kept = tiles_within(configs, named_args, 64 * 128, **kwargs)
    if len(kept) <= 1:  # the interpreter's single config
        return kept
    hd = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 64))
    atomic = bool(kwargs.get("ATOMIC_DQ", named_args.get("ATOMIC_DQ", False)))
    options = sum(bool(kwargs.get(f, named_args.get(f, False))) for f in ("HAS_SOFTCAP", "HAS_DROPOUT"))
    q = named_args.get("q_ptr")
    elem = q.element_size() if hasattr(q, "element_size") else 2
    return autotune_candidates([c for c in kept if _dkdv_fits(c, hd, elem, atomic, options)]
                               or [min(kept, key=lambda c: _atomic_dq_regs(c, hd, elem, options, atomic))])


def _zero_dq_accumulator(nargs, reset_only=False):
    """Autotuner pre-hook: benchmarking a config launches the kernel, whose atomics add into
    the dQ accumulator; zero it before each such launch and before the real one."""
    if nargs.get("ATOMIC_DQ"):
        nargs["dq_ptr"].zero_()


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, kv_keep, q_head0, do_head0, lse_head0, delta_head0, dq_head0, q_tile, do_tile, dq_tile,
    stride_qh, stride_qs, stride_doh, stride_dos, stride_lh, stride_ls, stride_dqh, stride_dqs,
    offs_n, first_m, n_blocks, GROUP, S_q, S_kv, DIAG, sm_scale,
    softcap, window, seed, rng_offset, bh0, drop_threshold, drop_scale,
    MASKED: tl.constexpr, HAS_KPM: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Accumulate into dk, dv the query blocks first_m + i * BLOCK_M, i < n_blocks, of each of
    the GROUP query heads sharing this kv head (one flat loop over (head, block): a nested
    head loop around the block loop costs registers). MASKED: apply the causal mask (blocks
    on the diagonal). Rows past S_q need no mask: they read LSE = +inf, so P = 0.
    ATOMIC_DQ: also add this key block's share of dQ, scale * dS K, to the fp32 buffer at
    dq_head0 (keys past S_kv are masked then: their P would multiply zero K rows, but an
    overflowing P would turn that into NaN)."""
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
        if HAS_SOFTCAP:
            cT, tT = _softcap(sT * sm_scale, softcap)
            pT = tl.math.exp2((cT - lse[None, :]) * LOG2E)
        else:
            # s * scale - lse first (one FMA on GPU), base 2 after: see the forward kernel
            pT = tl.math.exp2((sT * sm_scale - lse[None, :]) * LOG2E)
        if MASKED or HAS_KPM:
            keep = _visible(offs_m[None, :], offs_n[:, None], kv_keep[:, None], S_kv, DIAG, window, MASKED, HAS_KPM,
                            HAS_WINDOW and MASKED)
            pT = tl.where(keep, pT, 0.0)
        elif ATOMIC_DQ:
            pT = tl.where(kv_keep[:, None], pT, 0.0)  # kv_keep is offs_n < S_kv here
        dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        if HAS_DROPOUT:
            zT = _dropout_keep(seed, rng_offset, bh0 + g, offs_m[None, :], offs_n[:, None], drop_threshold)
            dv = tl.dot((tl.where(zT, pT, 0.0) * drop_scale).to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
            dpT = tl.where(zT, dpT * drop_scale, 0.0)
        else:
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        if HAS_SOFTCAP:
            dsT = dsT * (1.0 - tT * tT)
        dsT = dsT.to(q.dtype)
        dk = tl.dot(dsT, q, dk, input_precision=INPUT_PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(dsT), k, input_precision=INPUT_PRECISION) * sm_scale  # [BLOCK_M, D]
            tl.atomic_add(dq_head0 + g64 * stride_dqh + m64 * stride_dqs + dq_tile, dq,
                          mask=in_q[:, None], sem="relaxed")
    return dk, dv


@autotune(configs=dkdv_configs(),
          key=["Q_BUCKET", "KV_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_KPM", "ATOMIC_DQ",
               "HAS_SOFTCAP", "HAS_WINDOW", "HAS_DROPOUT"],
          prune_configs_by={"early_config_prune": _prune_dkdv},
          pre_hook=_zero_dq_accumulator)
@triton.jit
def _flash_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, kpm_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_ptr,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_kpmb, stride_kpms,
    stride_dob, stride_dos, stride_doh, stride_dod,
    stride_lb, stride_lh, stride_ls,
    stride_dkb, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvs, stride_dvh, stride_dvd,
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    GROUP, S_q, S_kv, Q_BUCKET, KV_BUCKET, sm_scale,
    softcap, window, seed, rng_offset, drop_threshold, drop_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """q_ptr, do_ptr: [B, S_q, H, D]; k_ptr, v_ptr, dk_ptr, dv_ptr: [B, S_kv, H_kv, D];
    kpm_ptr: [B, S_kv] uint8 (read only when HAS_KPM); lse_ptr, delta_ptr: [B, H, S_q] fp32
    (delta shares lse's strides); dq_ptr: [B, S_q, H, D] fp32, zero-initialised, which
    ATOMIC_DQ accumulates dQ into (not read otherwise). Any strides.
    Grid: (cdiv(S_kv, BLOCK_N), H_kv, B)."""
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
    bh0 = b * tl.num_programs(1) * GROUP + h0  # dropout counter of (batch, head h0)
    q_head0 = q_ptr + b * stride_qb + h0 * stride_qh
    do_head0 = do_ptr + b * stride_dob + h0 * stride_doh
    lse_head0 = lse_ptr + b * stride_lb + h0 * stride_lh
    delta_head0 = delta_ptr + b * stride_lb + h0 * stride_lh
    # the dQ accumulator is fp32 by contract; the cast pins that for builds that type every
    # pointer as the inputs' dtype (tools/aot_compile.py); a no-op for the launcher's buffer
    dq_head0 = dq_ptr.to(tl.pointer_type(tl.float32), bitcast=True) + b * stride_dqb + h0 * stride_dqh
    dq_tile = _tile_offsets(stride_dqs, stride_dqd, BLOCK_M, HEAD_DIM)

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
            dk, dv, k, v, kv_keep, q_head0, do_head0, lse_head0, delta_head0, dq_head0,
            q_tile, do_tile, dq_tile,
            stride_qh, stride_qs, stride_doh, stride_dos, stride_lh, stride_ls, stride_dqh, stride_dqs,
            offs_n, lo, (mid - lo) // BLOCK_M, GROUP, S_q, S_kv, diag, sm_scale,
            softcap, window, seed, rng_offset, bh0, drop_threshold, drop_scale,
            True, HAS_KPM, ATOMIC_DQ, HAS_SOFTCAP, HAS_WINDOW, HAS_DROPOUT, DOT_F32, INPUT_PRECISION, BLOCK_M)
    full_end = end
    if HAS_WINDOW:
        # queries i < n0 + window - diag have every key of the block in their window; those up
        # to n0 + BLOCK_N - 2 - diag + window see some of it (masked); later ones none (skipped)
        full_end = tl.minimum(tl.maximum(tl.maximum(n0 + window - diag, 0) // BLOCK_M * BLOCK_M, mid), end)
        w_end = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - diag + window, 0), BLOCK_M) * BLOCK_M,
                                      full_end), end)
        dk, dv = _dkdv_inner(
            dk, dv, k, v, kv_keep, q_head0, do_head0, lse_head0, delta_head0, dq_head0,
            q_tile, do_tile, dq_tile,
            stride_qh, stride_qs, stride_doh, stride_dos, stride_lh, stride_ls, stride_dqh, stride_dqs,
            offs_n, full_end, (w_end - full_end) // BLOCK_M, GROUP, S_q, S_kv, diag, sm_scale,
            softcap, window, seed, rng_offset, bh0, drop_threshold, drop_scale,
            True, HAS_KPM, ATOMIC_DQ, HAS_SOFTCAP, HAS_WINDOW, HAS_DROPOUT, DOT_F32, INPUT_PRECISION, BLOCK_M)
    dk, dv = _dkdv_inner(
        dk, dv, k, v, kv_keep, q_head0, do_head0, lse_head0, delta_head0, dq_head0,
        q_tile, do_tile, dq_tile,
        stride_qh, stride_qs, stride_doh, stride_dos, stride_lh, stride_ls, stride_dqh, stride_dqs,
        offs_n, mid, (full_end - mid) // BLOCK_M, GROUP, S_q, S_kv, diag, sm_scale,
        softcap, window, seed, rng_offset, bh0, drop_threshold, drop_scale,
        False, HAS_KPM, ATOMIC_DQ, HAS_SOFTCAP, HAS_WINDOW, HAS_DROPOUT, DOT_F32, INPUT_PRECISION, BLOCK_M)

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
    offs_m, lo, hi, S_kv, DIAG, sm_scale, softcap, window, seed, rng_offset, bh, drop_threshold, drop_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DROPOUT: tl.constexpr,
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
        if HAS_SOFTCAP:
            c, t = _softcap(s * sm_scale, softcap)
            p = tl.math.exp2((c - lse[:, None]) * LOG2E)
        else:
            p = tl.math.exp2((s * sm_scale - lse[:, None]) * LOG2E)
        if MASKED or HAS_KPM:
            kv_keep = in_kv
            if HAS_KPM:
                kv_keep = tl.load(kpm_base + offs_n * stride_kpms, mask=in_kv, other=0) != 0
            keep = _visible(offs_m[:, None], offs_n[None, :], kv_keep[None, :], S_kv, DIAG, window,
                            CAUSAL and MASKED, HAS_KPM, HAS_WINDOW and MASKED)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        if HAS_DROPOUT:
            z = _dropout_keep(seed, rng_offset, bh, offs_m[:, None], offs_n[None, :], drop_threshold)
            dp = tl.where(z, dp * drop_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=INPUT_PRECISION)
    return dq


@autotune(configs=dq_configs(), key=["Q_BUCKET", "KV_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_KPM",
                                     "HAS_SOFTCAP", "HAS_WINDOW", "HAS_DROPOUT"],
          prune_configs_by={"early_config_prune": prune_by_head_dim(128 * 64, max_rows_256=MAX_ROWS_256, row_tiles=2)})
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
    softcap, window, seed, rng_offset, drop_threshold, drop_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DROPOUT: tl.constexpr,
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
    bh = b * tl.num_programs(1) + h
    full_hi, hi = _kv_stages(m0, S_q, S_kv, CAUSAL, BLOCK_M, BLOCK_N)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    start = 0
    if HAS_WINDOW:  # the forward kernel's stages
        lo, start = _window_stage(m0, S_q, S_kv, window, hi, BLOCK_M, BLOCK_N)
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, kpm_base, k_tile, v_tile,
                       stride_ks, stride_vs, stride_kpms, offs_m, lo, start, S_kv, diag, sm_scale,
                       softcap, window, seed, rng_offset, bh, drop_threshold, drop_scale,
                       True, CAUSAL, HAS_KPM, HAS_SOFTCAP, HAS_WINDOW, HAS_DROPOUT, DOT_F32, INPUT_PRECISION, BLOCK_N)
        full_hi = tl.maximum(full_hi, start)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, kpm_base, k_tile, v_tile,
                   stride_ks, stride_vs, stride_kpms, offs_m, start, full_hi, S_kv, diag, sm_scale,
                   softcap, window, seed, rng_offset, bh, drop_threshold, drop_scale,
                   False, CAUSAL, HAS_KPM, HAS_SOFTCAP, HAS_WINDOW, HAS_DROPOUT, DOT_F32, INPUT_PRECISION, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, kpm_base, k_tile, v_tile,
                   stride_ks, stride_vs, stride_kpms, offs_m, full_hi, hi, S_kv, diag, sm_scale,
                   softcap, window, seed, rng_offset, bh, drop_threshold, drop_scale,
                   True, CAUSAL, HAS_KPM, HAS_SOFTCAP, HAS_WINDOW, HAS_DROPOUT, DOT_F32, INPUT_PRECISION, BLOCK_N)
    dq = dq * sm_scale
    tl.store(dq_ptr + b * stride_dqb + h * stride_dqh + m64 * stride_dqs
             + _tile_offsets(stride_dqs, stride_dqd, BLOCK_M, HEAD_DIM),
             dq.to(dq_ptr.dtype.element_ty), mask=in_q[:, None])


# --------------------------------------------------------------------------- launcher
def single_pass(need_dq: bool, need_dkdv: bool) -> bool:
    """Whether ``flash_attn_bwd`` computes dQ inside the dK/dV kernel with fp32 atomics (one
    pass, 2.5x the forward's FLOPs) rather than in the separate dQ kernel (bitwise
    reproducible, 3.5x): when all three gradients are wanted and PyTorch's deterministic mode
    (``torch.use_deterministic_algorithms(True)``) is off."""
    return bool(need_dq and need_dkdv) and not torch.are_deterministic_algorithms_enabled()


def flash_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   o: torch.Tensor, lse: torch.Tensor, kpm: torch.Tensor | None, causal: bool,
                   scale: float, need_dq: bool = True, need_dkdv: bool = True,
                   softcap: float | None = None, window: int | None = None,
                   dropout: tuple[float, int, int] | None = None,
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """do, o: [B, S_q, H, D]; q: [B, S_q, H, D]; k, v: [B, S_kv, H_kv, D]; lse: [B, H, S_q]
    fp32; kpm: [B, S_kv] bool or None; softcap, window, dropout: the forward's. Any strides.
    Returns (dq, dk, dv), contiguous, in the inputs' dtype; None for those not asked for."""
    B, S_q, H, D = q.shape
    S_kv, H_kv = k.shape[1], k.shape[2]
    check_head_dim(D)
    single = single_pass(need_dq, need_dkdv)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format) if need_dq and not single else None
    dk = torch.empty_like(k, memory_format=torch.contiguous_format) if need_dkdv else None
    dv = torch.empty_like(v, memory_format=torch.contiguous_format) if need_dkdv else None
    if q.numel() == 0 or k.numel() == 0:  # no query or no key: every gradient is zero
        if need_dq:
            dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
        for t in (dk, dv):
            if t is not None:
                t.zero_()
        return dq, dk, dv
    q, k, v, o, do = (tile_safe(t) for t in (q, k, v, o, do))
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    launch(_flash_bwd_preprocess_kernel, (triton.cdiv(S_q, PRE_BLOCK_M), H, B),
        o, do, delta, *o.stride(), *do.stride(), *delta.stride(), S_q,
        HEAD_DIM=D, BLOCK_M=PRE_BLOCK_M,
    )
    kk, kpm_strides = kpm_arg(kpm, lse)
    opts, flags = option_args(causal, softcap, window, dropout)
    common = dict(HEAD_DIM=D, CAUSAL=causal, HAS_KPM=kpm is not None, **flags, **dot_flags(q.dtype))
    sizes = (H // H_kv, S_q, S_kv, seq_bucket(S_q), seq_bucket(S_kv), scale, *opts)
    if need_dkdv:
        # single pass: dQ accumulates in fp32 (layout of q); otherwise dq_ptr is never read
        dq_acc = torch.zeros((B, S_q, H, D), device=q.device, dtype=torch.float32) if single else dk
        launch(_flash_bwd_dkdv_kernel, lambda meta: (triton.cdiv(S_kv, meta["BLOCK_N"]), H_kv, B),
            q, k, v, kk, do, lse, delta, dk, dv, dq_acc,
            *q.stride(), *k.stride(), *v.stride(), *kpm_strides, *do.stride(), *lse.stride(),
            *dk.stride(), *dv.stride(), *dq_acc.stride(), *sizes, ATOMIC_DQ=single, **common,
        )
        if single:
            dq = dq_acc.to(q.dtype)  # no copy for fp32
    if need_dq and not single:
        launch(_flash_bwd_dq_kernel, lambda meta: (triton.cdiv(S_q, meta["BLOCK_M"]), H, B),
            q, k, v, kk, do, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *kpm_strides, *do.stride(), *lse.stride(),
            *dq.stride(), *sizes, **common,
        )
    return dq, dk, dv


def aot_specs(B: int = 2, S: int = 4096, H: int = 32, H_kv: int = 8, quick: bool = False) -> list:
    """Representative launches of the backward kernels for ``tools/aot_compile.py``, for the
    variants of ``flash_attn_fwd.aot_variants`` and both paths (ATOMIC_DQ)."""
    from .flash_attn_fwd import aot_variants, attn_ints

    specs = []
    for dtype, prec, D, causal, kpm, opts in aot_variants(quick):
        ints = attn_ints(B, S, H, H_kv, D)
        if not any(opts.values()):  # the preprocess kernel has no options
            pre = dict(ints, stride_deltab=H * S, stride_deltah=S, stride_deltas=1)
            specs.append((_flash_bwd_preprocess_kernel, dtype, dict(HEAD_DIM=D, BLOCK_M=PRE_BLOCK_M), pre))
        consts = dict(HEAD_DIM=D, CAUSAL=causal, HAS_KPM=kpm, **opts, DOT_F32=False, INPUT_PRECISION=prec)
        for atomic in (False, True):  # deterministic two-kernel path; single pass
            specs.append((_flash_bwd_dkdv_kernel, dtype, dict(consts, ATOMIC_DQ=atomic), ints))
        specs.append((_flash_bwd_dq_kernel, dtype, consts, ints))
    return specs
