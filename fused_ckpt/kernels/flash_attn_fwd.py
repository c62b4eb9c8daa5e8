"""Flash attention forward: online softmax over key blocks, writing O and the log-sum-exp.

For one block of BLOCK_M queries of one (batch, head):

    S   = scale * Q K^T                 (BLOCK_M x BLOCK_N tiles, fp32)
    m   = running row max, l = running row sum of exp(S - m), acc = running sum of exp(S - m) V
          (exp evaluated as exp2((S - m) * log2(e)))
    O   = acc / l,   LSE = m + log(l)   (natural log, fp32, [B, H, S_q])

Masks: keys past S_kv; causal, aligned bottom-right (query i sees key j iff
j <= i + S_kv - S_q, as FlashAttention 2.1+); a boolean key padding mask [B, S_kv]
(True = keep); with HAS_WINDOW (causal only) a sliding window: query i also needs
j > i + S_kv - S_q - window (Hugging Face's ``sliding_window`` rule). A query that sees no
key gets O = 0 and LSE = -inf.

Options, each a constexpr flag so that a launch without it compiles to the plain kernel:
  * HAS_SOFTCAP: logit soft-capping (Gemma 2), S = softcap * tanh(scale * Q K^T / softcap),
    applied before the masks; LSE is that of the capped scores.
  * HAS_WINDOW: the sliding window above; key blocks left of every query's window are
    skipped, those it cuts through are masked.
  * HAS_DROPOUT: dropout on the probabilities, O = (P * Z / (1 - p)) V with a keep mask Z
    drawn from Philox at (seed; key, query, batch * H + head, rng_offset) (``_dropout_keep``),
    so the backward regenerates it and nothing is stored; LSE is that of the undropped P.

Key blocks are visited in two stages: blocks every query of the tile sees in full (no
mask arithmetic), then the blocks on the causal diagonal and the ragged tail (masked).
The ``_visible`` helper and the stage bounds are shared with the backward kernels.

GQA/MQA: query head h reads key/value head h // GROUP, GROUP = n_heads // n_kv_heads.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, SMEM_BYTES, TRITON_VERSION, autotune, autotune_candidates, dot_flags, launch

# Globals read inside @triton.jit code must be tl.constexpr (plain floats fail to compile).
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * log2(e)), exp2 is the fast op
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): log(l) = log2(l) * ln(2)
# Taylor coefficients of tanh(x) = x + x^3 (C3 + x^2 (C5 + ...)), used below |x| = 0.55 by _tanh
TANH_C17 = tl.constexpr(0.000590027440945586)  # 6404582/10854718875
TANH_C15 = tl.constexpr(-0.0014558343870513183)  # -929569/638512875
TANH_C13 = tl.constexpr(0.003592128036572481)  # 21844/6081075
TANH_C11 = tl.constexpr(-0.008863235529902197)  # -1382/155925
TANH_C9 = tl.constexpr(0.021869488536155203)  # 62/2835
TANH_C7 = tl.constexpr(-0.05396825396825397)  # -17/315
TANH_C5 = tl.constexpr(0.13333333333333333)  # 2/15
TANH_C3 = tl.constexpr(-0.3333333333333333)  # -1/3

HEAD_DIMS = (32, 64, 128, 256)  # one power-of-two tile per head (no masked head-dim lanes)


def fwd_configs() -> list[triton.Config]:
    """Autotune space (pruned by head dim below). Under the interpreter one 32x32 tile: big
    enough to be fast in numpy, small enough that the tests' short sequences still cross
    several blocks, so the unmasked, diagonal and tail stages all run. On GPU: 128/64-row
    query tiles with 2-4 stages. At head_dim 256 (16-bit, sm_90, triton 3.9) 128x32 spills
    3.3 KB, 64x64 72-92 B and 64x64 with 4 stages overflows shared memory (295,936 B), so the
    pruning keeps 64x32 (wgmma, 248-255 registers, no spills; triton 3.6 spills 4 B there, so
    with 3.6 only 32x32) and 32x32 (mma.sync, 168 registers) there (``MAX_ROWS_256``);
    tools/aot_compile.py has the numbers for every head dim and dtype."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=s, num_warps=w)
        for bm, bn, s, w in (
            (128, 128, 3, 8),
            (128, 64, 3, 8),
            (128, 32, 4, 4),
            (64, 64, 3, 4),
            (64, 64, 4, 4),
            (64, 32, 2, 4),
            (32, 32, 2, 4),
        )
    ]


def tiles_within(configs, named_args, max_tile_elems: int, max_tile_elems_256: int | None = None,
                 smem_bytes=None, max_rows_256: int | None = None, **kwargs) -> list:
    """The configs whose BLOCK_M*BLOCK_N*HEAD_DIM working set fits: ``max_tile_elems`` bounds
    BLOCK_M * BLOCK_N for 16-bit inputs at head_dim 64; larger head dims and fp32 inputs scale it
    down; ``max_tile_elems_256`` replaces the scaled bound at head_dim 256 where the register
    file, not the tile, is the limit (measured with tools/aot_compile.py), and ``max_rows_256``
    bounds BLOCK_M there (``MAX_ROWS_256``). ``smem_bytes(cfg,
    head_dim, elem)``: the config's shared memory, kept within SMEM_BYTES. The smallest tile if
    none fits."""
    hd = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 64))
    q = named_args.get("q_ptr")
    esize = q.element_size() if hasattr(q, "element_size") else 2
    if hd >= 256 and max_tile_elems_256 is not None:
        limit = max_tile_elems_256 * 2 // esize
    else:
        limit = max_tile_elems * 64 // hd * 2 // esize
    rows = max_rows_256 if hd >= 256 and max_rows_256 is not None else 1 << 30
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= limit
            and c.kwargs["BLOCK_M"] <= rows
            and (smem_bytes is None or smem_bytes(c, hd, esize) <= SMEM_BYTES)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


# With softcap or dropout on, the forward's score tile carries their temporaries (the tanh, the
# Philox words): configs are kept within this many estimated registers per thread
# (``option_regs``). sm_90 bf16 builds with every option (triton 3.9): 128x128 on 8 warps at
# head_dim 64 (estimate 304) spilled 2,184 B, 128x32 on 4 warps at 128 (320) and 64x32 on 4 warps
# at 256 (256) spilled 112 B and 40 B, the dQ kernel's 64x64 on 4 warps at 128 (256) 12 B; those
# estimated at <= 224 built clean (at most 255 registers).
OPTIONS_REGS = 224


def option_regs(cfg, head_dim: int, elem: int, row_tiles: int = 1) -> int:
    """Estimated 32-bit registers per thread of a forward / dQ build with softcap or dropout: the
    fp32 [BLOCK_M, D] accumulator, ``row_tiles`` [BLOCK_M, D] input tiles (forward: Q; dQ: Q and
    dO) and four [BLOCK_M, BLOCK_N] 32-bit tiles (scores, probabilities, the options' temporaries)."""
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    return (bm * head_dim + 4 * bm * bn + row_tiles * bm * head_dim * elem // 4) // (32 * cfg.num_warps)


def prune_by_head_dim(max_tile_elems: int, max_tile_elems_256: int | None = None, smem_bytes=None,
                      max_rows_256: int | None = None, row_tiles: int = 1):
    """early_config_prune factory over :func:`tiles_within` (drops tiles that would spill or
    overflow shared memory); with softcap or dropout on, also those over OPTIONS_REGS
    (:func:`option_regs` with ``row_tiles``; the fewest-register one if none fits)."""

    def prune(configs, named_args, **kwargs):
        kept = tiles_within(configs, named_args, max_tile_elems, max_tile_elems_256, smem_bytes, max_rows_256,
                            **kwargs)
        if len(kept) > 1 and any(kwargs.get(f, named_args.get(f, False)) for f in ("HAS_SOFTCAP", "HAS_DROPOUT")):
            hd = kwargs.get("HEAD_DIM", named_args.get("HEAD_DIM", 64))
            q = named_args.get("q_ptr")
            elem = q.element_size() if hasattr(q, "element_size") else 2
            kept = ([c for c in kept if option_regs(c, hd, elem, row_tiles) <= OPTIONS_REGS]
                    or [min(kept, key=lambda c: option_regs(c, hd, elem, row_tiles))])
        return autotune_candidates(kept)

    return prune


# At head_dim 256 the register file bounds the tiles that build without spills (sm_90, 16-bit):
# triton 3.9 builds the 64-row tiles (forward 64x32, dQ 64x32 and 64x16) clean, triton 3.6
# spills 4-48 B in them; both build 32x32 clean. Versions not measured get the 3.6 bound.
MAX_ROWS_256 = 64 if TRITON_VERSION >= (3, 9) else 32


def fwd_smem_bytes(cfg, head_dim: int, elem: int) -> int:
    """Shared memory of a forward build: ``num_stages`` K and V tiles, the Q tile and about
    1 KB of row statistics (sm_90 builds: 64x64 / 4 stages at head_dim 256 needs 295,936 B)."""
    bm, bn = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"]
    return (cfg.num_stages * 2 * bn + bm) * head_dim * elem + 1024


def seq_bucket(n: int) -> int:
    """Autotune key for a sequence length: the next power of two, so varying lengths in
    training reuse one tuning result per octave instead of re-tuning for every length."""
    return 1 << max(n - 1, 0).bit_length()


MAX_BLOCK = 256  # no tile is taller than this: bounds the int32 in-tile offsets


def tile_safe(t: torch.Tensor) -> torch.Tensor:
    """``t`` [B, S, H, D] if a tile's int32 offsets (MAX_BLOCK rows) cannot overflow, else a
    contiguous copy (only for exotic strides of 2^23 elements or more per row)."""
    if MAX_BLOCK * t.stride(1) + t.shape[3] * t.stride(3) < 2**31:
        return t
    t = t.contiguous()
    if MAX_BLOCK * t.stride(1) >= 2**31:
        raise ValueError(f"rows of {t.stride(1)} elements are too wide for the attention kernels")
    return t


def kpm_arg(kpm: torch.Tensor | None, dummy: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The key padding mask as a contiguous uint8 view (bool and uint8 share a layout) with its
    strides, or a dummy pointer and zero strides when there is none (HAS_KPM=False never reads
    it). Contiguous, so the kernels' int32 key offsets stay in range."""
    if kpm is None:
        return dummy, (0, 0)
    u8 = kpm.contiguous().view(torch.uint8)
    return u8, (u8.stride(0), u8.stride(1))


def check_head_dim(head_dim: int) -> None:
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"flash attention supports head_dim in {HEAD_DIMS}, got {head_dim}; "
                         "pad the heads or use a supported size")


# --------------------------------------------------------------------------- shared helpers
@triton.jit
def _visible(q_idx, k_idx, kv_keep, S_kv, DIAG, window, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
             HAS_WINDOW: tl.constexpr):
    """Which (query, key) pairs take part: q_idx and k_idx are broadcastable index tiles,
    kv_keep the key padding mask loaded for k_idx (ignored unless HAS_KPM); HAS_WINDOW: keys
    at or left of q_idx + DIAG - window are out."""
    keep = k_idx < S_kv
    if CAUSAL:
        keep = keep & (k_idx <= q_idx + DIAG)
    if HAS_KPM:
        keep = keep & kv_keep
    if HAS_WINDOW:
        keep = keep & (k_idx > q_idx + DIAG - window)
    return keep


@triton.jit
def _window_stage(m0, S_q, S_kv, window, hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sliding window, query tile [m0, m0 + BLOCK_M): key blocks before ``lo`` are left of every
    query's window (skipped); blocks [lo, w1) are cut by some query's window edge (masked);
    blocks from w1 on are inside every query's window."""
    diag = S_kv - S_q
    lo = tl.maximum(m0 + diag - window + 1, 0) // BLOCK_N * BLOCK_N
    # a key block [n0, ...) is inside the last query's window too iff n0 > m0 + BLOCK_M - 1 + diag - window
    w1 = (tl.maximum(m0 + BLOCK_M + diag - window, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    return lo, tl.minimum(tl.maximum(w1, lo), hi)


@triton.jit
def _tanh(x):
    """tanh in fp32 to about one ulp on every backend (the interpreter has no libdevice):
    an odd Taylor polynomial below |x| = 0.55 (terms to x^17), (1 - e) / (1 + e) with
    e = exp(-2|x|) <= 1/3 above (no cancellation, no overflow)."""
    ax = tl.abs(x)
    x2 = x * x
    p = x2 * TANH_C17 + TANH_C15
    p = p * x2 + TANH_C13
    p = p * x2 + TANH_C11
    p = p * x2 + TANH_C9
    p = p * x2 + TANH_C7
    p = p * x2 + TANH_C5
    p = p * x2 + TANH_C3
    small = x + x * x2 * p
    e = tl.math.exp2(ax * (-2.0 * LOG2E))
    big = (1.0 - e) / (1.0 + e)
    return tl.where(ax < 0.55, small, tl.where(x < 0, -big, big))


@triton.jit
def _softcap(s, softcap):
    """(softcap * tanh(s / softcap), the tanh): the capped scores and what their derivative,
    1 - tanh^2, needs."""
    t = _tanh(s * (1.0 / softcap))
    return softcap * t, t


@triton.jit
def _dropout_keep(seed, rng_offset, bh, q_idx, k_idx, threshold):
    """Dropout keep mask of (query, key) index tiles (broadcastable) of one (batch, head),
    ``bh = batch * H + head``: Philox-4x32-10 keyed by ``seed`` on the counter (key, query,
    bh, rng_offset) as uint32 words; kept iff the first word's top 31 bits >= threshold
    (threshold = round(p * 2^31): P(keep) = 1 - p). fused_ckpt.ops.attention.dropout_keep_mask
    computes the same bits with torch ops."""
    zero = q_idx * 0 + k_idx * 0
    r, _, _, _ = tl.philox(seed, (zero + k_idx).to(tl.int32), (zero + q_idx).to(tl.int32),
                           zero.to(tl.int32) + bh.to(tl.int32), zero.to(tl.int32) + rng_offset)
    return (r >> 1).to(tl.int32, bitcast=True) >= threshold


@triton.jit
def _kv_stages(m0, S_q, S_kv, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range of a query tile [m0, m0 + BLOCK_M): keys [0, full_hi) are visible to every
    query of the tile and in bounds (no mask needed); [full_hi, hi) need the mask."""
    diag = S_kv - S_q
    full_hi = S_kv // BLOCK_N * BLOCK_N
    hi = S_kv
    if CAUSAL:
        hi = tl.maximum(tl.minimum(m0 + BLOCK_M + diag, S_kv), 0)
        # a key block [n0, n0 + BLOCK_N) is fully visible iff n0 + BLOCK_N - 1 <= m0 + diag
        full_hi = tl.minimum(tl.maximum((m0 + diag + 1) // BLOCK_N * BLOCK_N, 0), full_hi)
    return full_hi, hi


@triton.jit
def _tile_offsets(stride_s, stride_d, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """int32 offsets of a [BLOCK, HEAD_DIM] tile from its first row. Addresses are a scalar
    int64 base (batch, head, first row) plus these: 64-bit math stays scalar, so tensors past
    2^31 elements are safe without 64-bit pointer tiles eating registers. The launchers keep
    BLOCK * stride_s within int32 (``tile_safe``)."""
    return tl.arange(0, BLOCK)[:, None] * stride_s + tl.arange(0, HEAD_DIM)[None, :] * stride_d


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, kpm_base, k_tile, v_tile,
    stride_ks, stride_vs, stride_kpms,
    offs_m, lo, hi, S_kv, DIAG, sm_scale, softcap, window, seed, rng_offset, bh, drop_threshold,
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
        s = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * sm_scale
        if HAS_SOFTCAP:
            s, _ = _softcap(s, softcap)
        if MASKED or HAS_KPM:
            kv_keep = in_kv
            if HAS_KPM:
                kv_keep = tl.load(kpm_base + offs_n * stride_kpms, mask=in_kv, other=0) != 0
            keep = _visible(offs_m[:, None], offs_n[None, :], kv_keep[None, :], S_kv, DIAG, window,
                            CAUSAL and MASKED, HAS_KPM, HAS_WINDOW and MASKED)
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with no visible key so far keeps m = -inf; exponentiate against 0 instead
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        # natural-log scores, converted to base 2 after the max is subtracted: s - m is small
        # where p matters, so the conversion adds no error at large |s| (PyTorch's accuracy)
        p = tl.math.exp2((s - m_safe[:, None]) * LOG2E)
        alpha = tl.math.exp2((m_i - m_safe) * LOG2E)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:  # l sums the undropped P; 1 / (1 - p) is applied to O at the end
            p = tl.where(_dropout_keep(seed, rng_offset, bh, offs_m[:, None], offs_n[None, :], drop_threshold), p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# --------------------------------------------------------------------------- forward kernel
@autotune(configs=fwd_configs(), key=["Q_BUCKET", "KV_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_KPM",
                                      "HAS_SOFTCAP", "HAS_WINDOW", "HAS_DROPOUT"],
          prune_configs_by={"early_config_prune": prune_by_head_dim(128 * 128, 64 * 32, fwd_smem_bytes, MAX_ROWS_256)})
@triton.jit
def _flash_fwd_kernel(
    q_ptr, k_ptr, v_ptr, kpm_ptr, o_ptr, lse_ptr,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_kpmb, stride_kpms,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ls,
    GROUP, S_q, S_kv, Q_BUCKET, KV_BUCKET, sm_scale,
    softcap, window, seed, rng_offset, drop_threshold, drop_scale,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """q_ptr: [B, S_q, H, D]; k_ptr, v_ptr: [B, S_kv, H_kv, D]; kpm_ptr: [B, S_kv] uint8
    (read only when HAS_KPM); o_ptr: [B, S_q, H, D]; lse_ptr: [B, H, S_q] fp32. Any strides.
    softcap (fp32), window, seed, rng_offset, drop_threshold (round(p * 2^31)) and drop_scale
    (1 / (1 - p)) are read only under their flags. Grid: (cdiv(S_q, BLOCK_M), H, B)."""
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    hk = h // GROUP
    offs_m = m0 + tl.arange(0, BLOCK_M)
    in_q = offs_m < S_q
    m64 = m0.to(tl.int64)

    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + m64 * stride_qs
                + _tile_offsets(stride_qs, stride_qd, BLOCK_M, HEAD_DIM), mask=in_q[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    kpm_base = kpm_ptr + b * stride_kpmb
    k_tile = _tile_offsets(stride_ks, stride_kd, BLOCK_N, HEAD_DIM)
    v_tile = _tile_offsets(stride_vs, stride_vd, BLOCK_N, HEAD_DIM)

    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    diag = S_kv - S_q
    bh = b * tl.num_programs(1) + h
    full_hi, hi = _kv_stages(m0, S_q, S_kv, CAUSAL, BLOCK_M, BLOCK_N)
    start = 0
    if HAS_WINDOW:  # blocks left of every window are skipped, those the window edge cuts are masked
        lo, start = _window_stage(m0, S_q, S_kv, window, hi, BLOCK_M, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, kpm_base, k_tile, v_tile, stride_ks, stride_vs, stride_kpms,
            offs_m, lo, start, S_kv, diag, sm_scale, softcap, window, seed, rng_offset, bh, drop_threshold,
            True, CAUSAL, HAS_KPM, HAS_SOFTCAP, HAS_WINDOW, HAS_DROPOUT, DOT_F32, INPUT_PRECISION, BLOCK_N)
        full_hi = tl.maximum(full_hi, start)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, kpm_base, k_tile, v_tile, stride_ks, stride_vs, stride_kpms,
        offs_m, start, full_hi, S_kv, diag, sm_scale, softcap, window, seed, rng_offset, bh, drop_threshold,
        False, CAUSAL, HAS_KPM, HAS_SOFTCAP, HAS_WINDOW, HAS_DROPOUT, DOT_F32, INPUT_PRECISION, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, kpm_base, k_tile, v_tile, stride_ks, stride_vs, stride_kpms,
        offs_m, full_hi, hi, S_kv, diag, sm_scale, softcap, window, seed, rng_offset, bh, drop_threshold,
        True, CAUSAL, HAS_KPM, HAS_SOFTCAP, HAS_WINDOW, HAS_DROPOUT, DOT_F32, INPUT_PRECISION, BLOCK_N)

    empty = l_i == 0.0  # no visible key: O = 0, LSE = -inf
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    if HAS_DROPOUT:
        o = o * drop_scale
    lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe) * LN2)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + m64 * stride_os
             + _tile_offsets(stride_os, stride_od, BLOCK_M, HEAD_DIM),
             o.to(o_ptr.dtype.element_ty), mask=in_q[:, None])
    tl.store(lse_ptr + b * stride_lb + h * stride_lh + m64 * stride_ls + tl.arange(0, BLOCK_M) * stride_ls,
             lse, mask=in_q)


# --------------------------------------------------------------------------- launcher
def dropout_threshold(p: float) -> int:
    """The 31-bit threshold of ``_dropout_keep`` for drop probability p in [0, 1)."""
    return min(round(p * 2**31), 2**31 - 1)


def option_args(causal: bool, softcap: float | None, window: int | None,
                dropout: tuple[float, int, int] | None) -> tuple[tuple, dict]:
    """(runtime arguments softcap, window, seed, rng_offset, drop_threshold, drop_scale; their
    constexpr flags) of the attention kernels. dropout: (p, seed, rng_offset) or None; an
    option that is off passes placeholders its flag keeps the kernel from reading."""
    if window is not None and not causal:
        raise ValueError("a sliding window needs causal attention")
    p, seed, rng_offset = dropout if dropout is not None and dropout[0] > 0 else (0.0, 0, 0)
    if not (0 <= seed < 2**63 and 0 <= rng_offset < 2**31):
        raise ValueError(f"dropout seed must be in [0, 2^63) and rng_offset in [0, 2^31), got {seed}, {rng_offset}")
    args = (float(softcap) if softcap is not None else 1.0, int(window) if window is not None else 0,
            int(seed), int(rng_offset), dropout_threshold(p), 1.0 / (1.0 - p))
    flags = dict(HAS_SOFTCAP=softcap is not None, HAS_WINDOW=window is not None, HAS_DROPOUT=p > 0)
    return args, flags


def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpm: torch.Tensor | None,
                   causal: bool, scale: float, softcap: float | None = None, window: int | None = None,
                   dropout: tuple[float, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, S_q, H, D]; k, v: [B, S_kv, H_kv, D] (any strides); kpm: [B, S_kv] bool or None;
    softcap, window (causal only), dropout (p, seed, rng_offset): see the module docstring.
    Returns (o [B, S_q, H, D] contiguous, lse [B, H, S_q] fp32)."""
    B, S_q, H, D = q.shape
    S_kv, H_kv = k.shape[1], k.shape[2]
    check_head_dim(D)
    assert k.shape == v.shape == (B, S_kv, H_kv, D) and H % H_kv == 0, (q.shape, k.shape, v.shape)
    o = torch.empty((B, S_q, H, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, S_q), device=q.device, dtype=torch.float32)
    if o.numel() == 0:
        return o, lse
    q, k, v = tile_safe(q), tile_safe(k), tile_safe(v)
    kk, kpm_strides = kpm_arg(kpm, lse)
    opts, flags = option_args(causal, softcap, window, dropout)
    grid = lambda meta: (triton.cdiv(S_q, meta["BLOCK_M"]), H, B)
    launch(_flash_fwd_kernel, grid,
        q, k, v, kk, o, lse,
        *q.stride(), *k.stride(), *v.stride(), *kpm_strides, *o.stride(), *lse.stride(),
        H // H_kv, S_q, S_kv, seq_bucket(S_q), seq_bucket(S_kv), scale, *opts,
        HEAD_DIM=D, CAUSAL=causal, HAS_KPM=kpm is not None, **flags, **dot_flags(q.dtype),
    )
    return o, lse


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


AOT_DTYPES = (("bf16", None), ("fp16", None), ("fp32", "ieee"), ("fp32", "tf32"))


NO_OPTIONS = dict(HAS_SOFTCAP=False, HAS_WINDOW=False, HAS_DROPOUT=False)
ALL_OPTIONS = dict(HAS_SOFTCAP=True, HAS_WINDOW=True, HAS_DROPOUT=True)


def aot_variants(quick: bool = False):
    """(dtype, INPUT_PRECISION, HEAD_DIM, CAUSAL, HAS_KPM, option flags) the attention kernels
    are compiled for by ``tools/aot_compile.py``: every dtype and head dim (what the pruning
    selects by), with the causal and padding masks both on (the most code), once without the
    options (softcap, window, dropout) and once with all three; quick (CI): bf16 at 64 and
    256, fp32 TF32 at 64 (IEEE fp32 attention builds take about a minute each), and bf16 at
    128 with every option."""
    if quick:
        return [("bf16", None, 64, True, False, NO_OPTIONS), ("bf16", None, 256, False, True, NO_OPTIONS),
                ("fp32", "tf32", 64, True, True, NO_OPTIONS), ("bf16", None, 128, True, False, ALL_OPTIONS)]
    return [(dt, prec, D, True, True, opts) for dt, prec in AOT_DTYPES for D in HEAD_DIMS
            for opts in (NO_OPTIONS, ALL_OPTIONS)]


def aot_specs(B: int = 2, S: int = 4096, H: int = 32, H_kv: int = 8, quick: bool = False) -> list:
    """(kernel, dtype, constexprs, integer args) of representative launches, for
    ``tools/aot_compile.py``: contiguous [B, S, H, D] tensors, GQA (``aot_variants``)."""
    specs = []
    for dtype, prec, D, causal, kpm, opts in aot_variants(quick):
        consts = dict(HEAD_DIM=D, CAUSAL=causal, HAS_KPM=kpm, **opts, DOT_F32=False, INPUT_PRECISION=prec)
        specs.append((_flash_fwd_kernel, dtype, consts, attn_ints(B, S, H, H_kv, D)))
    return specs


def attn_ints(B: int, S: int, H: int, H_kv: int, D: int) -> dict:
    """Integer (and scale) arguments of the attention kernels for contiguous tensors."""
    q = dict(b=S * H * D, s=H * D, h=D, d=1)
    kv = dict(b=S * H_kv * D, s=H_kv * D, h=D, d=1)
    ints = {"GROUP": H // H_kv, "S_q": S, "S_kv": S, "Q_BUCKET": seq_bucket(S), "KV_BUCKET": seq_bucket(S),
            "sm_scale": default_scale(D), "stride_kpmb": S, "stride_kpms": 1,
            "stride_lb": H * S, "stride_lh": S, "stride_ls": 1,
            # the options' runtime arguments: Gemma 2's cap and window, dropout 0.1 with a 63-bit seed
            "softcap": 50.0, "window": 4096, "seed": 2**62 + 12345, "rng_offset": 77,
            "drop_threshold": dropout_threshold(0.1), "drop_scale": 1 / 0.9}
    for name, st in (("q", q), ("o", q), ("do", q), ("dq", q), ("k", kv), ("v", kv), ("dk", kv), ("dv", kv)):
        ints.update({f"stride_{name}{dim}": val for dim, val in st.items()})
    return ints
