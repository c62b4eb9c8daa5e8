"""LM head + cross-entropy: the logits GEMM with a log-sum-exp epilogue, and its gradient tile.

With z = x W^T + b (fp32 accumulators) and s = c tanh(z / c) when a softcap c is set (else s = z):

    stats kernel     one (token tile, vocab split) per program: online max / sum-of-exp over the
                     split's vocabulary tiles, the target's logit s_t picked up on the fly and,
                     for label smoothing, the sum of the logits. The launcher merges the splits
                     into lse = log sum_j exp(s_j). No [tokens, V] tensor is ever written.

    dlogits kernel   one [BLOCK_M, BLOCK_N] logits tile recomputed, and in its epilogue

                         g = coef * (p (1 + 2 z_loss lse) - (1 - eps) onehot(t) - eps / V) * ds/dz

                     with p = exp(s - lse) and ds/dz = 1 - tanh^2(z / c) (1 without softcap).
                     The caller bounds the tile range (a chunk of tokens and vocabulary) and
                     turns g into dX = g W and dW = g^T x with GEMMs.

tanh is written through ``sigmoid`` (tanh(u) = 2 sigmoid(2u) - 1, 1 - tanh^2(u) =
4 sigmoid(2u) (1 - sigmoid(2u))) so the same code runs on CUDA and under the interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import ACC_REGS_FUSED, INTERPRET, autotune, dot_flags, fused_tile_configs, launch, resource_pruner
from .matmul import grouped_tile

# The stats partials are [splits, tokens] fp32; a vocabulary split is at least this many logits
# wide, so for many tokens there is one split (grid = token tiles) and for few tokens (decode,
# tiny batches) the vocabulary is spread over enough programs to fill the GPU.
MIN_SPLIT_VOCAB = 2048
TARGET_PROGRAMS = 1024  # about 8 programs per SM on an H100/H200-class part


@triton.jit
def _capped(z, softcap, SOFTCAP: tl.constexpr):
    """(s, ds/dz) for s = softcap * tanh(z / softcap); (z, 1) when SOFTCAP is off."""
    if SOFTCAP:
        sg = tl.sigmoid(2.0 * z / softcap)
        return softcap * (2.0 * sg - 1.0), 4.0 * sg * (1.0 - sg)
    else:
        return z, 1.0


@triton.jit
def _logits_tile(x_ptr, w_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n,
                 stride_xm, stride_xk, stride_wn, stride_wk, K,
                 HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 tile z[offs_m, offs_n] = x W^T + b, one pass over K."""
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        w = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        if DOT_F32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    return acc


def _acc_tiles(kw) -> int:  # the logits accumulator plus its exp / derivative in the epilogue
    return 2


def _stage_bytes(cfg, kw, elem) -> int:
    return (cfg["BLOCK_M"] * cfg["BLOCK_K"] + cfg["BLOCK_K"] * cfg["BLOCK_N"]) * elem


_PRUNE = {"early_config_prune": resource_pruner(_acc_tiles, _stage_bytes, "x_ptr", ACC_REGS_FUSED)}


@autotune(configs=fused_tile_configs(), key=["N", "K", "HAS_BIAS", "SOFTCAP", "NEED_SUM"],
                 prune_configs_by=_PRUNE)
@triton.jit
def _lce_stats_kernel(
    x_ptr, w_ptr, b_ptr, t_ptr, max_ptr, sumexp_ptr, tgt_ptr, sum_ptr,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ps,
    M, N, K, SPLITS, softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, NEED_SUM: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """x_ptr: [M, K]; w_ptr: [N, K] (nn.Linear layout); any strides. b_ptr: [N] contiguous;
    t_ptr: [M] int64 contiguous (targets; any value outside [0, N) matches no column).
    max_ptr, sumexp_ptr, tgt_ptr, sum_ptr: [SPLITS, M] fp32, row stride stride_ps, written for
    every (split, token): running max, sum of exp(s - max), the target's s (0 when the target is
    not in the split), and the sum of s (only when NEED_SUM)."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    tgt = tl.load(t_ptr + offs_m, mask=mask_m, other=-1)
    tiles_per_split = tl.cdiv(tl.cdiv(N, BLOCK_N), SPLITS)
    n_begin = pid_s * tiles_per_split * BLOCK_N
    n_end = tl.minimum(n_begin + tiles_per_split * BLOCK_N, N)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    t_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        z = _logits_tile(x_ptr, w_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n,
                         stride_xm, stride_xk, stride_wn, stride_wk, K,
                         HAS_BIAS, DOT_F32, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        s, _ = _capped(z, softcap, SOFTCAP)
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m_i = m_new
        t_i += tl.sum(tl.where(offs_n[None, :] == tgt[:, None], s, 0.0), 1)
        if NEED_SUM:
            s_i += tl.sum(tl.where(mask_n[None, :], s, 0.0), 1)
    out = pid_s * stride_ps + offs_m
    tl.store(max_ptr + out, m_i, mask=mask_m)
    tl.store(sumexp_ptr + out, l_i, mask=mask_m)
    tl.store(tgt_ptr + out, t_i, mask=mask_m)
    if NEED_SUM:
        tl.store(sum_ptr + out, s_i, mask=mask_m)


@autotune(configs=fused_tile_configs(), key=["N", "K", "HAS_BIAS", "SOFTCAP"],
                 prune_configs_by=_PRUNE)
@triton.jit
def _lce_dlogits_kernel(
    x_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, coef_ptr, dz_ptr,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_dzm, stride_dzn,
    M, N, K, t_offset, one_minus_eps, eps_over_v, two_z_loss, softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """x_ptr: [M, K]; w_ptr: [N, K] (a vocabulary slice starting at class t_offset); any
    strides. b_ptr: [N] contiguous; t_ptr: [M] int64, lse_ptr, coef_ptr: [M] fp32, contiguous;
    dz_ptr: [M, N], any strides, receives dLoss/dz (coef 0 for ignored tokens)."""
    pid = tl.program_id(0).to(tl.int64)
    tile_m, tile_n = grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    z = _logits_tile(x_ptr, w_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n,
                     stride_xm, stride_xk, stride_wn, stride_wk, K,
                     HAS_BIAS, DOT_F32, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    s, ds = _capped(z, softcap, SOFTCAP)
    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0)
    coef = tl.load(coef_ptr + offs_m, mask=mask_m, other=0.0)
    tgt = tl.load(t_ptr + offs_m, mask=mask_m, other=-1) - t_offset
    p = tl.exp(s - lse[:, None])
    g = p * (1.0 + two_z_loss * lse)[:, None] - eps_over_v
    g -= tl.where(offs_n[None, :] == tgt[:, None], one_minus_eps, 0.0)
    g = g * ds * coef[:, None]
    dz_ptrs = dz_ptr + offs_m[:, None] * stride_dzm + offs_n[None, :] * stride_dzn
    tl.store(dz_ptrs, g.to(dz_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------- launchers
def _splits(M: int, N: int) -> int:
    """Vocabulary splits for the stats kernel: enough programs to fill the GPU when there are few
    tokens, one split (no partials to merge) when the token tiles alone fill it."""
    if INTERPRET:  # numpy tiles: fewer, larger programs are faster; still exercise the merge
        return min(2, triton.cdiv(N, 32))
    token_tiles = triton.cdiv(M, 64)
    want = triton.cdiv(TARGET_PROGRAMS, token_tiles)
    return max(1, min(want, triton.cdiv(N, MIN_SPLIT_VOCAB)))


def lce_stats(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, target: torch.Tensor,
              softcap: float, need_sum: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x: [M, d], w: [V, d], b: [V] or None, target: [M] int64 contiguous. Returns fp32 [M]
    tensors (lse, target logit, sum of logits or None); the only temporaries are the
    [splits, M] partials."""
    M, K = x.shape
    N = w.shape[0]
    dev = x.device
    if M == 0:
        z = torch.zeros((0,), device=dev, dtype=torch.float32)
        return z, z.clone(), (z.clone() if need_sum else None)
    splits = _splits(M, N)
    part = torch.empty((4 if need_sum else 3, splits, M), device=dev, dtype=torch.float32)
    if b is not None:
        b = b.contiguous()
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), splits)
    launch(
        _lce_stats_kernel, grid, x, w, b if b is not None else w, target, part[0], part[1], part[2], part[-1],
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), part.stride(1),
        M, N, K, splits, float(softcap or 1.0),
        HAS_BIAS=b is not None, SOFTCAP=bool(softcap), NEED_SUM=need_sum,
        **dot_flags(x.dtype),
    )
    mx, se, tg = part[0], part[1], part[2]
    if splits == 1:
        lse = mx[0] + torch.log(se[0])
        return lse, tg[0].clone(), (part[3][0].clone() if need_sum else None)
    top = mx.max(0).values
    lse = top + torch.log((se * torch.exp(mx - top)).sum(0))
    return lse, tg.sum(0), (part[3].sum(0) if need_sum else None)


def lce_dlogits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, target: torch.Tensor,
                lse: torch.Tensor, coef: torch.Tensor, out: torch.Tensor, *, t_offset: int,
                label_smoothing: float, vocab: int, z_loss: float, softcap: float) -> torch.Tensor:
    """Writes dLoss/dz for the tokens of x and the classes of the slice w (class ids
    t_offset .. t_offset + w.shape[0]) into out [M, w.shape[0]]. target: [M] int64, lse, coef:
    [M] fp32, all contiguous; ``vocab`` is the full vocabulary size (label smoothing's eps / V)."""
    M, K = x.shape
    N = w.shape[0]
    if M == 0 or N == 0:
        return out
    if b is not None:
        b = b.contiguous()
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    launch(
        _lce_dlogits_kernel, grid, x, w, b if b is not None else w, target, lse, coef, out,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), out.stride(0), out.stride(1),
        M, N, K, t_offset, 1.0 - label_smoothing, label_smoothing / vocab, 2.0 * z_loss,
        float(softcap or 1.0),
        HAS_BIAS=b is not None, SOFTCAP=bool(softcap),
        **dot_flags(x.dtype),
    )
    return out


# ----------------------------------------------------------------------------- rows of stored logits
# recompute=False keeps no logits: its forward computes one [chunk, V] fp32 logits chunk with a
# GEMM, then this kernel turns each row into its statistics and its gradient, so the chunk's
# dX and dW follow from 3 GEMMs in all (no second logits GEMM).
ROW_BLOCK_N = 1024 if not INTERPRET else 128


@triton.jit
def _lce_rows_kernel(
    z_ptr, t_ptr, coef_ptr, dz_ptr, lse_ptr, tgt_ptr, sum_ptr,
    stride_zm, stride_zn, stride_dzm, stride_dzn,
    N, one_minus_eps, eps_over_v, two_z_loss, softcap,
    SOFTCAP: tl.constexpr, NEED_SUM: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per row. z_ptr: [M, N] fp32 logits (bias included), any strides; t_ptr: [M]
    int64, coef_ptr: [M] fp32, contiguous; dz_ptr: [M, N] (any strides) receives dLoss/dz
    scaled by coef; lse_ptr, tgt_ptr, sum_ptr: [M] fp32 (sum_ptr written only when NEED_SUM)."""
    row = tl.program_id(0).to(tl.int64)
    tgt = tl.load(t_ptr + row)
    coef = tl.load(coef_ptr + row)
    z_row = z_ptr + row * stride_zm
    m_i = float("-inf")
    l_i = 0.0
    t_i = 0.0
    s_i = 0.0
    for n0 in range(0, N, BLOCK_N):  # pass 1: online log-sum-exp, target logit, sum
        offs = n0 + tl.arange(0, BLOCK_N)
        mask = offs < N
        s, _ = _capped(tl.load(z_row + offs * stride_zn, mask=mask, other=0.0), softcap, SOFTCAP)
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new), 0)
        m_i = m_new
        t_i += tl.sum(tl.where(offs == tgt, s, 0.0), 0)
        if NEED_SUM:
            s_i += tl.sum(tl.where(mask, s, 0.0), 0)
    lse = m_i + tl.log(l_i)
    tl.store(lse_ptr + row, lse)
    tl.store(tgt_ptr + row, t_i)
    if NEED_SUM:
        tl.store(sum_ptr + row, s_i)
    for n0 in range(0, N, BLOCK_N):  # pass 2: the gradient row
        offs = n0 + tl.arange(0, BLOCK_N)
        mask = offs < N
        s, ds = _capped(tl.load(z_row + offs * stride_zn, mask=mask, other=0.0), softcap, SOFTCAP)
        g = tl.exp(s - lse) * (1.0 + two_z_loss * lse) - eps_over_v
        g -= tl.where(offs == tgt, one_minus_eps, 0.0)
        g = g * ds * coef
        tl.store(dz_ptr + row * stride_dzm + offs * stride_dzn, g.to(dz_ptr.dtype.element_ty), mask=mask)


def lce_rows(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, target: torch.Tensor,
             coef: torch.Tensor, out: torch.Tensor, *, label_smoothing: float, z_loss: float,
             softcap: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Logits of x against the whole vocabulary w ([M, V] fp32, one GEMM), then per row the
    statistics (lse, target logit, sum of logits when smoothing) and dLoss/dz * coef into
    out [M, V]. The [M, V] fp32 logits are the chunk's temporary: callers bound M."""
    from .matmul import gemm

    M, V = x.shape[0], w.shape[0]
    dev = x.device
    lse = torch.empty((M,), device=dev, dtype=torch.float32)
    tgt = torch.empty_like(lse)
    tot = torch.empty_like(lse) if label_smoothing else None
    if M == 0:
        return lse, tgt, tot
    z = gemm(x, w.t(), b, out_dtype=torch.float32)
    launch(
        _lce_rows_kernel, (M,), z, target, coef, out, lse, tgt, tot if tot is not None else lse,
        z.stride(0), z.stride(1), out.stride(0), out.stride(1),
        V, 1.0 - label_smoothing, label_smoothing / V, 2.0 * z_loss, float(softcap or 1.0),
        SOFTCAP=bool(softcap), NEED_SUM=bool(label_smoothing), BLOCK_N=ROW_BLOCK_N,
        num_warps=8 if not INTERPRET else 1,
    )
    return lse, tgt, tot


# ----------------------------------------------------------------------------- AOT compile specs
class _RowLaunch:
    """The row kernel at its one launch configuration, in the form ``tools/aot_compile.py``
    reads (``fn`` plus a one-entry ``configs``)."""

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.configs = [triton.Config({"BLOCK_N": 1024}, num_warps=8, num_stages=1)]


def aot_specs(T: int = 8192, D: int = 4096, V: int = 151936, quick: bool = False) -> list:
    """(kernel, dtype, constexprs, integer args) of representative launches for
    ``tools/aot_compile.py`` (Qwen2's vocabulary, 8192 tokens, d=4096, contiguous). The tool
    types every ``*_ptr`` with the spec's dtype, so the int64 targets and fp32 statistics are
    typed like the inputs there (same tiles and register shape)."""
    stats = dict(stride_xm=D, stride_xk=1, stride_wn=D, stride_wk=1, stride_ps=T, M=T, N=V, K=D,
                 SPLITS=2, softcap=30.0)
    dlog = dict(stride_xm=D, stride_xk=1, stride_wn=D, stride_wk=1, stride_dzm=V, stride_dzn=1,
                M=T, N=V, K=D, t_offset=0, one_minus_eps=0.9, eps_over_v=1e-6, two_z_loss=2e-4, softcap=30.0)
    rows = dict(stride_zm=V, stride_zn=1, stride_dzm=V, stride_dzn=1, N=V, one_minus_eps=0.9,
                eps_over_v=1e-6, two_z_loss=2e-4, softcap=30.0)
    dtypes = (("bf16", {"DOT_F32": False, "INPUT_PRECISION": None}),
              ("fp32", {"DOT_F32": False, "INPUT_PRECISION": "ieee"}),
              ("fp32", {"DOT_F32": False, "INPUT_PRECISION": "tf32"}))
    specs = []
    for dtype, dots in (dtypes[:1] + dtypes[2:] if quick else dtypes):
        specs.append((_lce_stats_kernel, dtype, dict(HAS_BIAS=True, SOFTCAP=True, NEED_SUM=True, **dots), stats))
        specs.append((_lce_dlogits_kernel, dtype, dict(HAS_BIAS=True, SOFTCAP=True, **dots), dlog))
    specs.append((_RowLaunch(_lce_rows_kernel), "fp32", dict(SOFTCAP=True, NEED_SUM=True), rows))
    return specs
