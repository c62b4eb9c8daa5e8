"""FFN up-projection with the activation fused into the GEMM epilogue.

    Z = x W1^T + b1                       (fp32 accumulators, never written unless STORE_Z)
    H = act(Z)                or, gated:  H = act(x Wg^T + bg) * (x Wu^T + bu), Z = [G | U]

The gated form computes the gate tile and the matching up tile in one pass over x (two
accumulators fed by the same x tile), so x is read once for both. The gate and up weights are
two pointers with their own strides: separate ``gate_proj`` / ``up_proj`` weights, or two views
of one packed ``[2f, d]`` weight (the launcher splits it), read where they live.

With HAS_LORA, each accumulator starts from a LoRA adapter's low-rank term instead of zero,

    G = scale_g (t_g B_g^T) + x Wg^T + bg,     U = scale_u (t_u B_u^T) + x Wu^T + bu

(t ``[M, r]`` the adapter's ``drop(x) A^T``, formed outside; a loop over r in steps of 16 before
the K loop), so the term is summed in fp32 with the base GEMM and rounded once, and no extra
accumulator tile is live during the K loop.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..activations import Activation
from ._common import (ACC_REGS_FUSED, autotune, dot_flags, fused_tile_configs, launch, resource_pruner,
                      size_bucket)
from .activation import act_fwd
from .matmul import NO_LORA_FLAGS, grouped_tile, lora_flags, low_rank_tile


def _up_acc_tiles(kw) -> int:
    return 2 if kw.get("GATED") else 1


def _up_stage_bytes(cfg, kw, elem) -> int:  # x tile + one (or two, gated) W1 tiles
    return (cfg["BLOCK_M"] * cfg["BLOCK_K"] + _up_acc_tiles(kw) * cfg["BLOCK_K"] * cfg["BLOCK_N"]) * elem


@autotune(configs=fused_tile_configs(), key=["M_BUCKET", "N", "K", "GATED", "STORE_Z", "HAS_LORA"],
          prune_configs_by={"early_config_prune": resource_pruner(
              _up_acc_tiles, _up_stage_bytes, "x_ptr", ACC_REGS_FUSED)})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _ffn_up_kernel(
    x_ptr, wg_ptr, wu_ptr, bg_ptr, bu_ptr, h_ptr, z_ptr, tg_ptr, lg_ptr, tu_ptr, lu_ptr,
    stride_xm, stride_xk, stride_wgn, stride_wgk, stride_wun, stride_wuk, stride_hm, stride_hn,
    stride_zm, stride_zn, stride_tgm, stride_tgr, stride_lgn, stride_lgr, stride_tum, stride_tur,
    stride_lun, stride_lur,
    M, N, K, M_BUCKET, R_G, R_U, scale_g, scale_u,
    ACT: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr,
    HAS_LORA: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    LORA_F32: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """x_ptr: [M, K]; wg_ptr: [N, K] (fc1, or the gate weight when GATED); wu_ptr: [N, K] (the up
    weight, read only when GATED); any strides. bg_ptr / bu_ptr: [N] contiguous (bu read only
    when GATED); h_ptr: [M, N]; z_ptr: [M, N or 2N] (gate columns, then up columns; written only
    when STORE_Z). M_BUCKET:
    ``size_bucket(M)``, the autotune key (unused in the body). Read only when HAS_LORA: tg_ptr
    [M, R_G] / tu_ptr [M, R_U] the gate's / up's t, lg_ptr [N, R_G] / lu_ptr [N, R_U] their B
    (rank 0: no adapter on that side), any strides; LORA_F32 / LORA_PRECISION: ``dot_flags`` of
    their dtype."""
    pid = tl.program_id(0).to(tl.int64)
    tile_m, tile_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    wg_ptrs = wg_ptr + offs_k[:, None] * stride_wgk + offs_n[None, :] * stride_wgn
    wu_ptrs = wu_ptr + offs_k[:, None] * stride_wuk + offs_n[None, :] * stride_wun
    if HAS_LORA:
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
        x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        w_mask = (offs_k[:, None] < k_left) & mask_n[None, :]
        wg = tl.load(wg_ptrs, mask=w_mask, other=0.0)
        if DOT_F32:
            x = x.to(tl.float32)
            wg = wg.to(tl.float32)
        acc_g = tl.dot(x, wg, acc_g, input_precision=INPUT_PRECISION)
        if GATED:
            wu = tl.load(wu_ptrs, mask=w_mask, other=0.0)
            if DOT_F32:
                wu = wu.to(tl.float32)
            acc_u = tl.dot(x, wu, acc_u, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wg_ptrs += BLOCK_K * stride_wgk
        wu_ptrs += BLOCK_K * stride_wuk
    if HAS_BIAS:
        acc_g += tl.load(bg_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_u += tl.load(bu_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if STORE_Z:
        z_ptrs = z_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn
        tl.store(z_ptrs, acc_g.to(z_ptr.dtype.element_ty), mask=mask)
        if GATED:
            tl.store(z_ptrs + N * stride_zn, acc_u.to(z_ptr.dtype.element_ty), mask=mask)
    h = act_fwd(acc_g, ACT)
    if GATED:
        h = h * acc_u
    h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_n[None, :] * stride_hn
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def keep_tile(seed, rng_offset, idx, threshold):
    """Keep mask of the flat elements ``idx`` (int64 tile): the bits of ``.dropout``'s kernel
    (and of ``ops.dropout.dropout_keep``)."""
    lo = idx.to(tl.int32)  # truncation: the low word
    hi = (idx >> 32).to(tl.int32)
    r, _, _, _ = tl.philox(seed, lo, hi, lo * 0 - 1, lo * 0 + rng_offset)
    return (r >> 1).to(tl.int32, bitcast=True) >= threshold


# LoRA input dropout: 8 x 128 elements per program (1024, as the dropout kernel: Philox is ~40
# integer ops per element, compute-bound at any larger size)
LORA_DROP_BLOCK_M, LORA_DROP_BLOCK_N = 8, 128


@triton.jit
def _lora_dropout_kernel(x_ptr, y_ptr, stride_xm, stride_xn, stride_ym, stride_yn, M, N, row0, seed, rng_offset,
                         threshold, scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """x_ptr, y_ptr: [M, N], any strides: rows row0 .. row0 + M - 1 of a LoRA adapter's
    [tokens, N] input. y = x * scale where the flat element (row0 + m) * N + n is kept, else 0.
    Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N))."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_n[None, :] * stride_xn, mask=mask, other=0.0)
    keep = keep_tile(seed, rng_offset, (row0 + offs_m)[:, None] * N + offs_n[None, :], threshold)
    y = tl.where(keep, x.to(tl.float32) * scale, 0.0)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, y.to(y_ptr.dtype.element_ty),
             mask=mask)


def lora_dropout(x: torch.Tensor, p: float, seed: int, rng_offset: int, row0: int) -> torch.Tensor:
    """``drop(x)`` for x [m, n] (any strides), rows row0 .. row0 + m - 1 of a [tokens, n] input:
    a new contiguous tensor, ``x * keep / (1 - p)`` with the keep mask of
    ``ops.dropout.dropout_keep(seed, rng_offset, p, row0 * n, (row0 + m) * n)`` (the same bits)."""
    from .flash_attn_fwd import dropout_threshold

    M, N = x.shape
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M and N:
        grid = (triton.cdiv(M, LORA_DROP_BLOCK_M), triton.cdiv(N, LORA_DROP_BLOCK_N))
        launch(_lora_dropout_kernel, grid, x, y, x.stride(0), x.stride(1), y.stride(0), y.stride(1), M, N, row0,
               seed, rng_offset, dropout_threshold(p), 1.0 / (1.0 - p),
               BLOCK_M=LORA_DROP_BLOCK_M, BLOCK_N=LORA_DROP_BLOCK_N)
    return y


def split_fc1(w1: torch.Tensor, b1: torch.Tensor | None, w_up: torch.Tensor | None,
              b_up: torch.Tensor | None, gated: bool):
    """(wg, bg, wu, bu): the gate and up weights (and biases) as the kernels read them. With
    ``w_up`` given they are (w1, b1, w_up, b_up); a gated packed ``w1`` ``[2f, d]`` is split into
    two row views (no copy); ungated, (w1, b1, w1, b1) (the up pointers are never read)."""
    if not gated:
        return w1, b1, w1, b1
    if w_up is not None:
        return w1, b1, w_up, b_up
    f = w1.shape[0] // 2
    return w1[:f], (None if b1 is None else b1[:f]), w1[f:], (None if b1 is None else b1[f:])


def split_fc1_lora(lora_fc1, lora_up, packed: bool, gated: bool, f: int):
    """(gate side, up side), each (t [M, r], B [f, r], scaling) or None: the fc1 adapter's
    ``lora_fc1`` and the separate up weight's ``lora_up`` (each (t, B, scaling) or None) as the
    kernels read them. A packed gated fc1's adapter (B [2f, r]) serves both sides with one t
    (B split into two row views); ungated, the fc1 adapter is the gate side."""
    if gated and packed and lora_fc1 is not None:
        t, b, s = lora_fc1
        return (t, b[:f], s), (t, b[f:], s)
    return lora_fc1, (lora_up if gated else None)


def lora_launch_args(sides, ref: torch.Tensor):
    """(tensors, strides, ranks, scales, constexprs) of the LoRA arguments of a fused FFN kernel
    for ``sides`` (each (t, B, scaling) or None; rank 0 and ``ref`` as a stand-in pointer for an
    absent one). Sides in two dtypes (float32 and x's) are both read as float32."""
    present = [sd for sd in sides if sd is not None]
    if not present:
        return [ref, ref] * len(sides), [0, 0, 0, 0] * len(sides), [0] * len(sides), [0.0] * len(sides), \
            dict(HAS_LORA=False, **NO_LORA_FLAGS)
    dtypes = {sd[0].dtype for sd in present}
    dt = present[0][0].dtype if len(dtypes) == 1 else torch.float32
    tensors, strides, ranks, scales = [], [], [], []
    for sd in sides:
        if sd is None:
            t = b = ref
            ranks.append(0)
            scales.append(0.0)
        else:
            t, b = sd[0].to(dt), sd[1].to(dt)
            ranks.append(b.shape[1])
            scales.append(float(sd[2]))
        tensors += [t, b]
        strides += [t.stride(0), t.stride(-1), b.stride(0), b.stride(-1)]
    return tensors, strides, ranks, scales, dict(HAS_LORA=True, **lora_flags(dt, ref.dtype))


def ffn_up(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, act: Activation,
           store_z: bool, w_up: torch.Tensor | None = None,
           b_up: torch.Tensor | None = None, lora: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x: [M, d] (any strides); w1: [F1, d] (gated: packed [2f, d], gate rows then up rows), or,
    with ``w_up`` [f, d] given, the gate weight [f, d]; any strides. Biases contiguous. Returns
    (h [M, f], z [M, F1] or None; gated F1 = 2f, gate columns then up columns). ``lora``: the
    (gate side, up side) of :func:`split_fc1_lora`, whose terms join z in the accumulators."""
    M, K = x.shape
    wg, bg, wu, bu = split_fc1(w1, b1, w_up, b_up, act.gated)
    N = wg.shape[0]
    F1 = 2 * N if act.gated else N
    h = torch.empty((M, N), device=x.device, dtype=x.dtype)
    z = torch.empty((M, F1), device=x.device, dtype=x.dtype) if store_z else None
    if M == 0 or N == 0:
        return h, z
    zz = z if z is not None else h
    lt, lstrides, ranks, scales, lflags = lora_launch_args(lora if lora is not None else (None, None), x)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    launch(_ffn_up_kernel, grid,
        x, wg, wu, bg if bg is not None else wg, bu if bu is not None else wu, h, zz, *lt,
        x.stride(0), x.stride(1), wg.stride(0), wg.stride(1), wu.stride(0), wu.stride(1),
        h.stride(0), h.stride(1), zz.stride(0), zz.stride(1), *lstrides,
        M, N, K, size_bucket(M), *ranks, *scales,
        ACT=act.base, GATED=act.gated, HAS_BIAS=bg is not None, STORE_Z=store_z, **lflags,
        **dot_flags(x.dtype),
    )
    return h, z
