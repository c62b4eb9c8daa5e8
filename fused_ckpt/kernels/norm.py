"""RMSNorm and LayerNorm over the last dimension: forward, and backward from saved statistics.

For a row x of width N (all math fp32, one rounding to the output dtype):

    RMSNorm:    rstd = 1 / sqrt(mean(x^2) + eps)              xhat = x * rstd
    LayerNorm:  mean = sum(x) / N, rstd = 1 / sqrt(mean((x - mean)^2) + eps)
                                                              xhat = (x - mean) * rstd
    y = xhat * w (+ b)                    (w = 1, b = 0 without elementwise affine)

The forward writes the per-row statistics (rstd, and mean for LayerNorm) in fp32, or, with
LOAD_STATS, reads them instead (re-applying a norm whose statistics were saved). The
backward never re-reduces the statistics; with g = dy * w it needs two row sums:

    RMSNorm:    dx = rstd * (g - xhat * mean(g * xhat))
    LayerNorm:  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    dw = sum_rows(dy * xhat)          db = sum_rows(dy)

dw and db are reduced without atomics: program p sums a fixed range of rows into row p of
an fp32 [P, N] buffer, and the launcher sums the P rows (a deterministic torch reduction).
Rows up to ``FUSED_BWD_MAX_BLOCK_N`` wide keep the dw/db accumulators in registers next to
the row (one pass over x and dy); wider rows would spill, so dx is one launch and dw/db a
second, column-blocked launch of the same kernel (x and dy are read twice).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, launch

MAX_N = 16384  # widest row the kernels take: a whole row of the forward lives in registers
# Rows of a tile are batched until the tile holds this many elements: narrow rows (N=128)
# then move 8 KiB of bf16 per program instead of 256 B, which is what hides load latency.
TILE_ELEMS = 4096
MAX_BLOCK_M = 16  # ... but no more than this many rows per tile (enough programs for small M)
# Widest power-of-two row whose fused backward (x, dy, w, dw and db accumulators live at
# once) compiles for sm_90 without register spills (ptxas -v via tools/aot_compile.py).
FUSED_BWD_MAX_BLOCK_N = 8192
DW_BLOCK_M, DW_BLOCK_N, DW_WARPS = 16, 256, 8  # column-blocked dw/db tile for wider rows
# (16 elements per thread per tensor)
# Plain loads are not software-pipelined (sm_90 code is identical for 1 to 3 stages); load
# latency is hidden by several resident programs per SM instead, see WARPS_PER_SM.
NUM_STAGES = 1
# Backward programs (rows of the dw partial buffer) per SM: enough to keep this many warps
# resident (16 warps x 32 threads x <=128 registers fill sm_90's 64K-register file).
WARPS_PER_SM = 16
INTERPRET_PARTIALS = 4  # under the interpreter: a few programs, each looping over several tiles


@triton.jit
def _normalize(x, mean, rstd, mask, IS_RMS: tl.constexpr):
    """xhat for a [BLOCK_M, BLOCK_N] fp32 tile x (zero where ``mask`` is False); mean, rstd:
    [BLOCK_M] fp32 (mean unused for RMSNorm)."""
    if IS_RMS:
        xc = x
    else:
        xc = tl.where(mask, x - mean[:, None], 0.0)
    return xc * rstd[:, None]


@triton.jit
def _norm_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
    stride_xm, stride_ym,
    M, N,
    EPS: tl.constexpr, IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    LOAD_STATS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """x_ptr [M, N], y_ptr [M, N]: unit column stride, row strides given. w_ptr, b_ptr [N]
    (read when HAS_W / HAS_B). mean_ptr, rstd_ptr [M] fp32, contiguous: written, or read
    when LOAD_STATS (mean_ptr only for LayerNorm). Needs BLOCK_N >= N.
    Grid: (cdiv(M, BLOCK_M),)."""
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M
    r = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = (row0 + r) < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]
    # scalar int64 row base + int32 in-tile offsets (the launcher bounds BLOCK_M * stride)
    x = tl.load(x_ptr + row0 * stride_xm + (r[:, None] * stride_xm + cols[None, :]),
                mask=mask, other=0.0).to(tl.float32)
    if LOAD_STATS:
        rstd = tl.load(rstd_ptr + row0 + r, mask=row_ok, other=0.0).to(tl.float32)
        if IS_RMS:
            mean = rstd  # unused
        else:
            mean = tl.load(mean_ptr + row0 + r, mask=row_ok, other=0.0).to(tl.float32)
    else:
        if IS_RMS:
            mean = tl.sum(x, axis=1)  # unused
            var = tl.sum(x * x, axis=1) / N
        else:
            mean = tl.sum(x, axis=1) / N
            xc = tl.where(mask, x - mean[:, None], 0.0)
            var = tl.sum(xc * xc, axis=1) / N
            tl.store(mean_ptr + row0 + r, mean, mask=row_ok)
        rstd = tl.rsqrt(var + EPS)
        tl.store(rstd_ptr + row0 + r, rstd, mask=row_ok)
    y = _normalize(x, mean, rstd, mask, IS_RMS)
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + row0 * stride_ym + (r[:, None] * stride_ym + cols[None, :]),
             y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(
    x_ptr, w_ptr, dy_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr,
    stride_xm, stride_dym, stride_dxm,
    M, N, ROWS_PER_PROG,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, NEED_DX: tl.constexpr, NEED_DW: tl.constexpr,
    NEED_DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """x_ptr, dy_ptr, dx_ptr [M, N]: unit column stride. w_ptr [N] (HAS_W). mean_ptr, rstd_ptr
    [M] fp32 contiguous. dw_ptr, db_ptr: [P, N] fp32 contiguous partial sums, row p written
    by program p over rows [p * ROWS_PER_PROG, (p + 1) * ROWS_PER_PROG), a multiple of
    BLOCK_M. NEED_DX needs whole rows (BLOCK_N >= N, one column block); without it, columns
    are blocked over program_id(1). Grid: (P, cdiv(N, BLOCK_N))."""
    pid = tl.program_id(0).to(tl.int64)
    row_start = pid * ROWS_PER_PROG
    r = tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for i in range(0, ROWS_PER_PROG, BLOCK_M):
        row0 = row_start + i
        row_ok = (row0 + r) < M
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + row0 * stride_xm + (r[:, None] * stride_xm + cols[None, :]),
                    mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + row0 * stride_dym + (r[:, None] * stride_dym + cols[None, :]),
                     mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row0 + r, mask=row_ok, other=0.0).to(tl.float32)
        if IS_RMS:
            mean = rstd  # unused
        else:
            mean = tl.load(mean_ptr + row0 + r, mask=row_ok, other=0.0).to(tl.float32)
        xhat = _normalize(x, mean, rstd, mask, IS_RMS)
        if NEED_DX:
            if HAS_W:
                g = dy * w[None, :]
            else:
                g = dy
            c1 = tl.sum(xhat * g, axis=1) / N
            if IS_RMS:
                dx = (g - xhat * c1[:, None]) * rstd[:, None]
            else:
                c2 = tl.sum(g, axis=1) / N
                dx = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
            tl.store(dx_ptr + row0 * stride_dxm + (r[:, None] * stride_dxm + cols[None, :]),
                     dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw_acc += dy * xhat
        if NEED_DB:
            db_acc += dy
    if NEED_DW:
        tl.store(dw_ptr + pid * N + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    if NEED_DB:
        tl.store(db_ptr + pid * N + cols, tl.sum(db_acc, axis=0), mask=col_ok)


# ----------------------------------------------------------------------------- launchers
def row_tile(N: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) of a whole-row tile for width N: 16 fp32 elements per
    thread per tensor (8 warps for 4096-element tiles), capped at 16 warps, so 32 at N=16384
    (ptxas-checked without spills, see aot_specs; sm_90 allows 128 registers a thread at
    16 warps)."""
    block_n = triton.next_power_of_2(N)
    block_m = max(1, min(MAX_BLOCK_M, TILE_ELEMS // block_n))
    warps = max(1, min(16, block_m * block_n // 512))
    return block_m, block_n, warps


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_partials(M: int, block_m: int, warps: int, device: torch.device) -> tuple[int, int]:
    """(P, rows per program) for the backward: P programs (rows of the dw partial buffer),
    each over a contiguous range of whole tiles; P depends only on M, the tile and the device,
    so the reduction order, and the result, is the same on every run."""
    tiles = triton.cdiv(M, block_m)
    if device.type != "cuda":
        target = INTERPRET_PARTIALS
    else:
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        target = sms * max(1, WARPS_PER_SM // warps)
    per_prog = triton.cdiv(tiles, max(1, min(target, tiles)))
    rows = per_prog * block_m
    return triton.cdiv(M, rows), rows


def _rows_ok(t: torch.Tensor, block_m: int) -> torch.Tensor:
    """A 2-D view the kernels can address: unit column stride and in-tile offsets
    (block_m * row stride) within int32; otherwise a contiguous copy."""
    if t.stride(1) != 1 or block_m * t.stride(0) >= 2**31:
        return t.contiguous()
    return t


def norm_fwd(x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, eps: float,
             rms: bool, mean: torch.Tensor | None = None, rstd: torch.Tensor | None = None):
    """y, mean, rstd for x [M, N] (any row stride). With ``rstd`` (and ``mean``) given, they
    are read, not computed, and returned as given. mean is None for RMSNorm."""
    M, N = x.shape
    assert 1 <= N <= MAX_N, N
    block_m, block_n, warps = row_tile(N)
    x = _rows_ok(x, block_m)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    load = rstd is not None
    if not load:
        rstd = torch.empty((M,), device=x.device, dtype=torch.float32)
        mean = None if rms else torch.empty((M,), device=x.device, dtype=torch.float32)
    if M == 0:
        return y, mean, rstd
    launch(_norm_fwd_kernel, (triton.cdiv(M, block_m),),
        x, w if w is not None else x, b if b is not None else x, y,
        mean if mean is not None else rstd, rstd,
        x.stride(0), y.stride(0), M, N,
        EPS=float(eps), IS_RMS=rms, HAS_W=w is not None, HAS_B=b is not None, LOAD_STATS=load,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=NUM_STAGES,
    )
    return y, mean, rstd


def norm_bwd(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None, mean: torch.Tensor | None,
             rstd: torch.Tensor, rms: bool, need_dx: bool, need_dw: bool, need_db: bool):
    """(dx [M, N] in x's dtype or None, dw [N] fp32 or None, db [N] fp32 or None) for
    x, dy [M, N] and the forward's statistics mean, rstd [M] fp32 (mean None for RMSNorm)."""
    M, N = x.shape
    assert 1 <= N <= MAX_N, N
    dev = x.device
    block_m, block_n, warps = row_tile(N)
    fused = block_n <= FUSED_BWD_MAX_BLOCK_N
    tile_rows = block_m if fused else max(block_m, DW_BLOCK_M)
    x, dy = _rows_ok(x, tile_rows), _rows_ok(dy, tile_rows)
    dx = torch.empty((M, N), device=dev, dtype=x.dtype) if need_dx else None
    if M == 0:
        z = torch.zeros((N,), device=dev, dtype=torch.float32)
        return dx, (z if need_dw else None), (z.clone() if need_db else None)
    # dw/db come from the fused launch, or (wide rows) from a column-blocked second launch
    acc_tile = (block_m, block_n, warps) if fused else (DW_BLOCK_M, DW_BLOCK_N, DW_WARPS)
    P, rows = num_partials(M, acc_tile[0], acc_tile[2], dev)
    dw_part = torch.empty((P, N), device=dev, dtype=torch.float32) if need_dw else None
    db_part = torch.empty((P, N), device=dev, dtype=torch.float32) if need_db else None
    unused = rstd  # stands in for pointers a launch does not touch
    common = dict(x_ptr=x, w_ptr=w if w is not None else x, dy_ptr=dy,
                  mean_ptr=mean if mean is not None else unused, rstd_ptr=rstd,
                  dx_ptr=dx if dx is not None else x,
                  dw_ptr=dw_part if dw_part is not None else unused,
                  db_ptr=db_part if db_part is not None else unused,
                  stride_xm=x.stride(0), stride_dym=dy.stride(0),
                  stride_dxm=dx.stride(0) if dx is not None else 0, M=M, N=N,
                  IS_RMS=rms, HAS_W=w is not None)
    if need_dx or (fused and (need_dw or need_db)):
        P_dx, rows_dx = (P, rows) if fused else num_partials(M, block_m, warps, dev)
        launch(_norm_bwd_kernel, (P_dx, 1),
            ROWS_PER_PROG=rows_dx, NEED_DX=need_dx, NEED_DW=need_dw and fused,
            NEED_DB=need_db and fused, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
            num_stages=NUM_STAGES, **common)
    if not fused and (need_dw or need_db):
        launch(_norm_bwd_kernel, (P, triton.cdiv(N, DW_BLOCK_N)),
            ROWS_PER_PROG=rows, NEED_DX=False, NEED_DW=need_dw, NEED_DB=need_db,
            BLOCK_M=DW_BLOCK_M, BLOCK_N=DW_BLOCK_N, num_warps=DW_WARPS,
            num_stages=NUM_STAGES, **common)
    dw = dw_part.sum(0) if need_dw else None
    db = db_part.sum(0) if need_db else None
    return dx, dw, db


# ----------------------------------------------------------------------------- AOT specs
class _FixedLaunch:
    """A kernel at one launch configuration, in the form ``tools/aot_compile.py`` reads
    (``fn`` plus a one-entry ``configs``): the norm kernels choose BLOCK_M, BLOCK_N and
    num_warps from the row width instead of autotuning, and the compile must use the same."""

    def __init__(self, fn, block_m: int, block_n: int, warps: int, stages: int):
        self.fn = fn
        self.__name__ = fn.__name__
        self.configs = [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n},
                                      num_warps=warps, num_stages=stages)]


def aot_specs(M: int = 8192) -> list:
    """(kernel, dtype, constexprs, integer args) of representative launches, for
    ``tools/aot_compile.py``: contiguous [M, N] rows at the widths that pick each tile shape
    (N=128: 16-row tiles; 4096; 8192, the widest fused backward; 16384, the split backward),
    with the tile and num_warps the launchers use. compile_kernel gives every ``*_ptr`` the
    spec's dtype, so the fp32 specs are the exact signatures of fp32 inputs while the bf16
    ones type the fp32 statistics and partial sums as bf16 (same tiles and register shape)."""
    specs = []
    sms = 132  # H100 / H200

    def rows_per_prog(block_m, warps):
        return triton.cdiv(triton.cdiv(M, block_m), sms * max(1, WARPS_PER_SM // warps)) * block_m
    for dtype, N, rms, affine in (("bf16", 128, False, True), ("bf16", 4096, True, True),
                                  ("bf16", 8192, False, True), ("bf16", 16384, False, True),
                                  ("bf16", 16384, True, True), ("fp32", 8192, False, True),
                                  ("fp32", 16384, False, True), ("fp16", 4096, False, False)):
        block_m, block_n, warps = row_tile(N)
        ints = dict(M=M, N=N, stride_xm=N, stride_ym=N, stride_dym=N, stride_dxm=N,
                    ROWS_PER_PROG=rows_per_prog(block_m, warps))
        fwd = _FixedLaunch(_norm_fwd_kernel, block_m, block_n, warps, NUM_STAGES)
        for load in (False, True):
            specs.append((fwd, dtype, dict(EPS=1e-6, IS_RMS=rms, HAS_W=affine, HAS_B=affine and not rms,
                                           LOAD_STATS=load), ints))
        fused = block_n <= FUSED_BWD_MAX_BLOCK_N
        bwd = _FixedLaunch(_norm_bwd_kernel, block_m, block_n, warps, NUM_STAGES)
        specs.append((bwd, dtype, dict(IS_RMS=rms, HAS_W=affine, NEED_DX=True, NEED_DW=affine and fused,
                                       NEED_DB=affine and fused and not rms), ints))
        if affine and not fused:
            dw = _FixedLaunch(_norm_bwd_kernel, DW_BLOCK_M, DW_BLOCK_N, DW_WARPS, NUM_STAGES)
            specs.append((dw, dtype, dict(IS_RMS=rms, HAS_W=True, NEED_DX=False, NEED_DW=True, NEED_DB=not rms),
                          dict(ints, ROWS_PER_PROG=rows_per_prog(DW_BLOCK_M, DW_WARPS))))
    return specs
