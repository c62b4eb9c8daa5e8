"""Replayed elementwise dropout: y = x * Z / (1 - p), Z from Philox, regenerated, never stored.

Element i (row-major index of a contiguous tensor) is kept iff the first word of
Philox-4x32-10 keyed by ``seed`` at the counter (i mod 2^32, i div 2^32, 0xFFFFFFFF,
rng_offset) has top 31 bits >= threshold = round(p * 2^31). The third counter word
0xFFFFFFFF keeps these streams apart from the attention-probability masks of
:mod:`.flash_attn_fwd` (whose third word is batch * heads + head). The same kernel is the
forward (on the output) and the backward (on the output gradient): the map is linear and its
own transpose. :func:`fused_ckpt.ops.dropout.dropout_keep` draws the same bits with torch ops.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import launch

# Elements per program: 1024 fp32 loads (4 KiB) keep a warp group busy; Philox is ~40 integer
# ops per element, so the kernel is compute-bound at any larger size too.
DROPOUT_BLOCK = 1024


@triton.jit
def _dropout_kernel(x_ptr, y_ptr, N, seed, rng_offset, threshold, scale, BLOCK: tl.constexpr):
    """x_ptr, y_ptr: [N] contiguous. Grid: (cdiv(N, BLOCK),)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = idx < N
    x = tl.load(x_ptr + idx, mask=inb, other=0.0)
    lo = idx.to(tl.int32)  # truncation: the low word
    hi = (idx >> 32).to(tl.int32)
    r, _, _, _ = tl.philox(seed, lo, hi, lo * 0 - 1, lo * 0 + rng_offset)
    keep = (r >> 1).to(tl.int32, bitcast=True) >= threshold
    y = tl.where(keep, x.to(tl.float32) * scale, 0.0)
    tl.store(y_ptr + idx, y.to(y_ptr.dtype.element_ty), mask=inb)


def dropout_apply(x: torch.Tensor, p: float, seed: int, rng_offset: int) -> torch.Tensor:
    """x * Z / (1 - p) as a new contiguous tensor (x read in row-major order)."""
    from .flash_attn_fwd import dropout_threshold

    x = x.contiguous()
    y = torch.empty_like(x)
    if x.numel():
        launch(_dropout_kernel, (triton.cdiv(x.numel(), DROPOUT_BLOCK),),
               x, y, x.numel(), seed, rng_offset, dropout_threshold(p), 1.0 / (1.0 - p), BLOCK=DROPOUT_BLOCK)
    return y


def aot_specs(quick: bool = False) -> list:
    """The dropout kernel for ``tools/aot_compile.py`` (no autotuning: one build per dtype)."""
    ints = {"N": 8192 * 4096, "seed": 2**62 + 12345, "rng_offset": 77, "threshold": 214748365, "scale": 1 / 0.9}
    return [(_dropout_kernel, dt, dict(BLOCK=DROPOUT_BLOCK), ints) for dt in ("bf16", "fp32")]
