"""Rotary position embedding, Hugging Face Llama convention (``rotate_half``).

With x = [x1 | x2] split at D/2 and per-(token, frequency) angles a:

    out1 = x1 cos(a) - x2 sin(a)          out2 = x2 cos(a) + x1 sin(a)

INVERSE applies the transposed rotation (angle -a): the backward of the forward rotation,
since a rotation's Jacobian is the rotation itself. The cos/sin tables are built by the
caller in fp32 (torch's accurate trig; Triton's fast sin/cos lose accuracy at the large
angles of long sequences); the rotation is done in fp32 and rounded once.

Partial rotary (GPT-NeoX, Phi): the caller passes the rotated slice ``x[..., :rotary_dim]``
(a strided view; the launcher reads strides), so the remaining dims are never touched. HALF
need not be a power of two (e.g. rotary_dim 48 -> 24): the tile is BLOCK_HALF wide, masked.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, launch

# Tokens per program: a [16, D/2] tile per head keeps 16-64 KiB of loads in flight at
# D=64-256 while cos/sin are read once per token block and reused across all heads.
ROPE_BLOCK_T = 16


@triton.jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    stride_xb, stride_xs, stride_xh, stride_xd,
    stride_cb, stride_cs, stride_cd,
    stride_ob, stride_os, stride_oh, stride_od,
    S, H,
    HALF: tl.constexpr, INVERSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """x_ptr, out_ptr: [B, S, H, 2*HALF] (may be the same tensor: in place); cos_ptr, sin_ptr:
    [B or 1, S, HALF] fp32 sharing strides (stride_cb = 0 broadcasts one table over the batch).
    Grid: (cdiv(S, BLOCK_T), B)."""
    t0 = tl.program_id(0) * BLOCK_T
    b = tl.program_id(1).to(tl.int64)
    t64 = t0.to(tl.int64)
    rows = tl.arange(0, BLOCK_T)
    offs_f = tl.arange(0, BLOCK_HALF)
    mask = ((t0 + rows) < S)[:, None] & (offs_f < HALF)[None, :]
    # scalar int64 bases + int32 in-tile offsets (as the attention kernels)
    c_off = b * stride_cb + t64 * stride_cs + rows[:, None] * stride_cs + offs_f[None, :] * stride_cd
    c = tl.load(cos_ptr + c_off, mask=mask, other=0.0)
    s = tl.load(sin_ptr + c_off, mask=mask, other=0.0)
    if INVERSE:
        s = -s
    x_tile = rows[:, None] * stride_xs + offs_f[None, :] * stride_xd
    o_tile = rows[:, None] * stride_os + offs_f[None, :] * stride_od
    x_base = x_ptr + b * stride_xb + t64 * stride_xs
    o_base = out_ptr + b * stride_ob + t64 * stride_os
    for h in range(0, H):
        x_row = x_base + h * stride_xh + x_tile
        o_row = o_base + h * stride_oh + o_tile
        x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + HALF * stride_xd, mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * c - x2 * s
        o2 = x2 * c + x1 * s
        tl.store(o_row, o1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(o_row + HALF * stride_od, o2.to(out_ptr.dtype.element_ty), mask=mask)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Rotate ``x`` [B, S, H, D] (any strides: a slice of the head dim for partial rotary) in
    place. cos, sin: [B or 1, S, D/2] fp32, same strides."""
    B, S, H, D = x.shape
    assert cos.shape == sin.shape and cos.shape[1:] == (S, D // 2) and cos.shape[0] in (1, B), (cos.shape, x.shape)
    assert cos.stride() == sin.stride() and cos.dtype == sin.dtype == torch.float32
    if x.numel() == 0:
        return x
    cb = cos.stride(0) if cos.shape[0] == B and B > 1 else 0
    launch(_rope_kernel, (triton.cdiv(S, ROPE_BLOCK_T), B),
        x, cos, sin, x,
        *x.stride(), cb, cos.stride(1), cos.stride(2), *x.stride(),
        S, H,
        HALF=D // 2, INVERSE=inverse, BLOCK_T=ROPE_BLOCK_T, BLOCK_HALF=triton.next_power_of_2(max(D // 2, 1)),
        num_warps=2 if INTERPRET else 4,
    )
    return x


def aot_specs(B: int = 2, S: int = 4096, H: int = 32) -> list:
    """A representative launch for ``tools/aot_compile.py``: in place on a contiguous
    [B, S, H, 128] tensor, one cos/sin table for the batch."""
    D = 128
    st = dict(b=S * H * D, s=H * D, h=D, d=1)
    ints = {"S": S, "H": H, "stride_cb": 0, "stride_cs": D // 2, "stride_cd": 1}
    ints.update({f"stride_x{k}": v for k, v in st.items()})
    ints.update({f"stride_o{k}": v for k, v in st.items()})
    return [(_rope_kernel, "bf16", dict(HALF=D // 2, INVERSE=False, BLOCK_T=ROPE_BLOCK_T, BLOCK_HALF=D // 2), ints)]
