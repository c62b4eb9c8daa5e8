"""FFN backward through the hidden layer, with the pre-activation recomputed in registers.

For one [BLOCK_M, BLOCK_N] tile of the hidden layer, one pass over d_model accumulates

    dH = dY W2                    (always)
    Z  = x W1^T + b1              (RECOMPUTE; otherwise Z is loaded from the saved tensor;
                                   gated: G = x Wg^T + bg and U = x Wu^T + bu, two weight
                                   pointers with their own strides)

and the epilogue writes

    dZ = dH * act'(Z)                              ungated
    dG = dH * U * act'(G),  dU = dH * act(G)       gated, Z = [G | U]
    H  = act(Z)  or  act(G) * U                    only when STORE_H (needed for dW2)

so Z never travels through HBM. dW1 = dZ^T x (gated: dWg = dG^T x, dWu = dU^T x), dW2 = dY^T H
and dX = dZ W1 follow as GEMMs.

With HAS_LORA (LoRA adapters on frozen weights), the accumulators start from the adapters'
low-rank terms instead of zero (loops over r in steps of 16 before the K loop):

    G, U  (RECOMPUTE)   + scale_g (t_g B_g^T), + scale_u (t_u B_u^T)     t kept from the forward
    dH                  + drop'(scale_2 (g_2 A_2)),  g_2 = dY B_2 [M, r] (formed outside)

``drop'`` is the fc2 adapter's input dropout (LORA_DROP), whose keep mask is regenerated here
from its Philox (seed, offset) over the [tokens, N] input (row ``row0 + m``, column n), the bits
of :mod:`.dropout`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..activations import Activation
from ._common import (ACC_REGS_FUSED, TRITON_VERSION, autotune, dot_flags, fused_tile_configs, launch,
                      resource_pruner, size_bucket)
from .activation import act_fwd_and_grad
from .ffn_fwd import split_fc1
from .ffn_fwd import keep_tile, lora_launch_args
from .matmul import grouped_tile, low_rank_tile


# Without RECOMPUTE, Z is loaded in the epilogue. Ungated, triton 3.6 works through the loaded
# tile element-wise (sm_90, bf16: 128x128 on 8 warps at 156-158 registers, no spills), while
# triton 3.9 holds it whole (the same build spills 80 B, the 4-warp 128x64 / 64x128 ones
# 128-172 B): it counts as a tile except with 3.6 (unmeasured versions count it).
_LOADED_Z_COUNTS = TRITON_VERSION != (3, 6)


def _bwd_acc_tiles(kw) -> int:
    """fp32 tiles the register budget counts: the k-loop's accumulators, dH plus G (and U,
    gated) when RECOMPUTE; without RECOMPUTE dH plus the loaded Z: gated, G and U count as one
    tile (sm_90 bf16 builds of 128x64 / 64x128 on 8 warps: 244-254 registers, no spills; 128x128
    spills 1 KB with triton 3.9); ungated see ``_LOADED_Z_COUNTS``."""
    if kw.get("RECOMPUTE"):
        tiles = 3 if kw.get("GATED") else 2
    else:
        tiles = 2 if kw.get("GATED") or _LOADED_Z_COUNTS else 1
    # LORA_DROP: the fc2 adapter's keep mask (Philox over the whole tile, while dH is live) counts
    # as one more (sm_90 bf16, gated, recomputing: 64x64x64 on 4 warps spills 72-180 B with it,
    # none without; the 64x64 8-warp tile it leaves builds clean)
    return tiles + (1 if kw.get("LORA_DROP") else 0)


def _bwd_stage_bytes(cfg, kw, elem) -> int:  # dY and W2 tiles, plus x and W1 tiles when recomputing
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    tiles = bm * bk + bk * bn
    if kw.get("RECOMPUTE"):
        tiles += bm * bk + (2 if kw.get("GATED") else 1) * bk * bn
    return tiles * elem


@autotune(configs=fused_tile_configs(), key=["M_BUCKET", "N", "K", "GATED", "RECOMPUTE", "STORE_H", "HAS_LORA",
                                               "LORA_DROP"],
          prune_configs_by={"early_config_prune": resource_pruner(
              _bwd_acc_tiles, _bwd_stage_bytes, "dy_ptr", ACC_REGS_FUSED)})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _ffn_bwd_hidden_kernel(
    x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, z_ptr, dy_ptr, w2_ptr, dz_ptr, h_ptr,
    tg_ptr, lg_ptr, tu_ptr, lu_ptr, g2_ptr, a2_ptr,
    stride_xm, stride_xk, stride_wgn, stride_wgk, stride_wun, stride_wuk, stride_zm, stride_zn,
    stride_dym, stride_dyk, stride_w2k, stride_w2n, stride_dzm, stride_dzn, stride_hm, stride_hn,
    stride_tgm, stride_tgr, stride_lgn, stride_lgr, stride_tum, stride_tur, stride_lun, stride_lur,
    stride_g2m, stride_g2r, stride_a2n, stride_a2r,
    M, N, K, M_BUCKET, R_G, R_U, R_2, scale_g, scale_u, scale_2, seed, rng_offset, threshold, drop_scale, row0,
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr,
    RECOMPUTE: tl.constexpr, STORE_H: tl.constexpr, HAS_LORA: tl.constexpr, LORA_DROP: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    LORA_F32: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """x_ptr: [M, K]; wg_ptr: [N, K] (fc1, or the gate weight when GATED); wu_ptr: [N, K] (the up
    weight, read only when GATED); bg_ptr / bu_ptr: [N] contiguous; z_ptr: [M, N or 2N]
    (read only when not RECOMPUTE); dy_ptr: [M, K]; w2_ptr: [K, N] (fc2.weight, d_model x d_ff);
    dz_ptr: [M, N or 2N]; h_ptr: [M, N] (written only when STORE_H). Any strides. M_BUCKET:
    ``size_bucket(M)``, the autotune key (unused in the body). Read only when HAS_LORA (any
    strides; rank 0: no such adapter): tg_ptr [M, R_G] / tu_ptr [M, R_U] and lg_ptr [N, R_G] /
    lu_ptr [N, R_U], the gate's / up's t and B (only when RECOMPUTE); g2_ptr [M, R_2] = dY B_2,
    a2_ptr read as [N, R_2] (A_2 transposed: stride_a2n = A_2.stride(1)). LORA_DROP: the fc2
    input's keep mask from (seed, rng_offset), flat index (row0 + m) * N + n, kept iff the
    Philox word's top 31 bits >= threshold, kept values times drop_scale."""
    pid = tl.program_id(0).to(tl.int64)
    tile_m, tile_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]

    dy_ptrs = dy_ptr + offs_m[:, None] * stride_dym + offs_k[None, :] * stride_dyk
    w2_ptrs = w2_ptr + offs_k[:, None] * stride_w2k + offs_n[None, :] * stride_w2n
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    wg_ptrs = wg_ptr + offs_k[:, None] * stride_wgk + offs_n[None, :] * stride_wgn
    wu_ptrs = wu_ptr + offs_k[:, None] * stride_wuk + offs_n[None, :] * stride_wun
    if HAS_LORA:
        acc_dh = low_rank_tile(g2_ptr, a2_ptr, stride_g2m, stride_g2r, stride_a2n, stride_a2r, offs_m, offs_n,
                               mask_m, mask_n, R_2, BLOCK_M, BLOCK_N, LORA_F32, LORA_PRECISION) * scale_2
        if LORA_DROP:
            idx = (row0 + offs_m)[:, None] * N + offs_n[None, :]
            acc_dh = tl.where(keep_tile(seed, rng_offset, idx, threshold), acc_dh * drop_scale, 0.0)
    else:
        acc_dh = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LORA and RECOMPUTE:
        acc_g = low_rank_tile(tg_ptr, lg_ptr, stride_tgm, stride_tgr, stride_lgn, stride_lgr, offs_m, offs_n,
                              mask_m, mask_n, R_G, BLOCK_M, BLOCK_N, LORA_F32, LORA_PRECISION) * scale_g
        if GATED:
            acc_u = low_rank_tile(tu_ptr, lu_ptr, stride_tum, stride_tur, stride_lun, stride_lur, offs_m, offs_n,
                                  mask_m, mask_n, R_U, BLOCK_M, BLOCK_N, LORA_F32, LORA_PRECISION) * scale_u
        else:
            acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        row_mask = mask_m[:, None] & (offs_k[None, :] < k_left)
        col_mask = (offs_k[:, None] < k_left) & mask_n[None, :]
        dy = tl.load(dy_ptrs, mask=row_mask, other=0.0)
        w2 = tl.load(w2_ptrs, mask=col_mask, other=0.0)
        if DOT_F32:
            dy = dy.to(tl.float32)
            w2 = w2.to(tl.float32)
        acc_dh = tl.dot(dy, w2, acc_dh, input_precision=INPUT_PRECISION)
        if RECOMPUTE:
            x = tl.load(x_ptrs, mask=row_mask, other=0.0)
            wg = tl.load(wg_ptrs, mask=col_mask, other=0.0)
            if DOT_F32:
                x = x.to(tl.float32)
                wg = wg.to(tl.float32)
            acc_g = tl.dot(x, wg, acc_g, input_precision=INPUT_PRECISION)
            if GATED:
                wu = tl.load(wu_ptrs, mask=col_mask, other=0.0)
                if DOT_F32:
                    wu = wu.to(tl.float32)
                acc_u = tl.dot(x, wu, acc_u, input_precision=INPUT_PRECISION)
        dy_ptrs += BLOCK_K * stride_dyk
        w2_ptrs += BLOCK_K * stride_w2k
        x_ptrs += BLOCK_K * stride_xk
        wg_ptrs += BLOCK_K * stride_wgk
        wu_ptrs += BLOCK_K * stride_wuk

    if RECOMPUTE:
        if HAS_BIAS:
            acc_g += tl.load(bg_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            if GATED:
                acc_u += tl.load(bu_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    else:
        z_ptrs = z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn
        acc_g = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            acc_u = tl.load(z_ptrs + N * stride_zn, mask=mask, other=0.0).to(tl.float32)

    a, da = act_fwd_and_grad(acc_g, ACT)
    dz_ptrs = dz_ptr + offs_m[:, None] * stride_dzm + offs_n[None, :] * stride_dzn
    if GATED:
        tl.store(dz_ptrs, (acc_dh * acc_u * da).to(dz_ptr.dtype.element_ty), mask=mask)
        tl.store(dz_ptrs + N * stride_dzn, (acc_dh * a).to(dz_ptr.dtype.element_ty), mask=mask)
        h = a * acc_u
    else:
        tl.store(dz_ptrs, (acc_dh * da).to(dz_ptr.dtype.element_ty), mask=mask)
        h = a
    if STORE_H:
        h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_n[None, :] * stride_hn
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask)


def ffn_bwd_hidden(x: torch.Tensor, z: torch.Tensor | None, dy: torch.Tensor, w1: torch.Tensor,
                   b1: torch.Tensor | None, w2: torch.Tensor, act: Activation,
                   store_h: bool, w_up: torch.Tensor | None = None,
                   b_up: torch.Tensor | None = None, lora: tuple | None = None,
                   lora_dh: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x, dy: [M, d]; z: [M, F1] or None (then recomputed from x); w1: [F1, d] (gated: packed
    [2f, d]) or, with ``w_up`` [f, d] given, the gate weight [f, d]; w2: [d, f]; any strides.
    Returns (dz [M, F1], h [M, f] or None); gated dz is [dG | dU].

    LoRA: ``lora`` the (gate side, up side) of :func:`.ffn_fwd.split_fc1_lora` (read only when
    z is recomputed); ``lora_dh`` (g2 [M, r] = dY B_2, A_2 [r, f], scaling, p, seed, rng_offset,
    row0): dH gets ``drop'(scaling g2 A_2)``, the fc2 adapter's term, whose dropout (p > 0)
    keeps element (m, n) of the fc2 input as ``dropout_keep(seed, rng_offset, p)`` keeps flat
    element (row0 + m) * f + n."""
    M, K = dy.shape
    wg, bg, wu, bu = split_fc1(w1, b1, w_up, b_up, act.gated)
    N = w2.shape[1]
    F1 = 2 * N if act.gated else N
    dz = torch.empty((M, F1), device=dy.device, dtype=dy.dtype)
    h = torch.empty((M, N), device=dy.device, dtype=dy.dtype) if store_h else None
    if M == 0 or N == 0:
        return dz, h
    recompute = z is None
    zz = x if recompute else z
    hh = h if h is not None else dz
    g2 = (lora_dh[0], lora_dh[1].t(), lora_dh[2]) if lora_dh is not None else None
    sides = tuple(lora) if lora is not None and recompute else (None, None)
    lt, lstrides, ranks, scales, lflags = lora_launch_args(sides + (g2,), dy)
    p, seed, rng_offset, row0 = lora_dh[3:] if lora_dh is not None else (0.0, 0, 0, 0)
    threshold, drop_scale = 0, 1.0
    if p > 0:
        from .flash_attn_fwd import dropout_threshold

        threshold, drop_scale = dropout_threshold(p), 1.0 / (1.0 - p)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    launch(_ffn_bwd_hidden_kernel, grid,
        x, wg, wu, bg if bg is not None else wg, bu if bu is not None else wu, zz, dy, w2, dz, hh, *lt,
        x.stride(0), x.stride(1), wg.stride(0), wg.stride(1), wu.stride(0), wu.stride(1),
        zz.stride(0), zz.stride(1),
        dy.stride(0), dy.stride(1), w2.stride(0), w2.stride(1), dz.stride(0), dz.stride(1),
        hh.stride(0), hh.stride(1), *lstrides,
        M, N, K, size_bucket(M), *ranks, *scales, seed, rng_offset, threshold, drop_scale, row0,
        ACT=act.base, GATED=act.gated, HAS_BIAS=bg is not None,
        RECOMPUTE=recompute, STORE_H=store_h, LORA_DROP=bool(p > 0 and g2 is not None), **lflags,
        **dot_flags(dy.dtype),
    )
    return dz, h
