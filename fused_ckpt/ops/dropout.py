"""Replayed dropout as a ``torch.library`` custom op: the mask is a function of (seed,
rng_offset, element index), so nothing is saved for backward but two ints.

``fused_ckpt::dropout_replay(x, p, seed, rng_offset, backend) -> y``
    y = x * Z / (1 - p), Z the keep mask of :mod:`fused_ckpt.kernels.dropout` over x's
    row-major element index; the backward is the same op on the gradient (dx = dy * Z /
    (1 - p)). Saves nothing (``ctx.save_for_backward`` is not called; p, seed and rng_offset
    are plain ints/floats on ctx). Backends: "triton" (the elementwise kernel) and "aten"
    (:func:`dropout_keep`, the same bits from a torch Philox, chunk by chunk).

Used for residual / output dropout (GPT-2's MLP ``dropout(c_proj(...))`` and ``resid_dropout``,
GPT-NeoX's ``post_attention_dropout`` / ``post_mlp_dropout``) after the fused FFN and attention
block ops: the op's input (the block output) is not kept either, so the checkpoint contract of
the op before it is unchanged.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import check_backend_dtype
from .attention import draw_dropout_seed, philox_word0

ATEN_CHUNK = 2**20  # elements per Philox chunk on the aten path (~16 int64 temporaries each)


def dropout_keep(seed: int, rng_offset: int, p: float, start: int, end: int, device) -> Tensor:
    """Keep mask (bool [end - start]) of flat elements [start, end): the Triton kernel's bits."""
    from ..kernels.flash_attn_fwd import dropout_threshold

    idx = torch.arange(start, end, device=device, dtype=torch.int64)
    r = philox_word0(seed, idx & 0xFFFFFFFF, idx >> 32, torch.tensor(0xFFFFFFFF, device=device),
                     torch.tensor(rng_offset, device=device))
    return (r >> 1) >= dropout_threshold(p)


def _aten_dropout(x: Tensor, p: float, seed: int, rng_offset: int) -> Tensor:
    x = x.contiguous()
    flat = x.view(-1)
    y = torch.empty_like(x)
    out = y.view(-1)
    scale = 1.0 / (1.0 - p)
    for s in range(0, flat.numel(), ATEN_CHUNK):
        e = min(s + ATEN_CHUNK, flat.numel())
        keep = dropout_keep(seed, rng_offset, p, s, e, x.device)
        out[s:e] = (flat[s:e] * scale).masked_fill_(~keep, 0.0)
    return y


@torch.library.custom_op("fused_ckpt::dropout_replay", mutates_args=())
def dropout_replay(x: Tensor, p: float, seed: int, rng_offset: int, backend: str) -> Tensor:
    """x * Z / (1 - p) (a new contiguous tensor); see the module docstring."""
    if p == 0:
        return x.clone(memory_format=torch.contiguous_format)
    if backend == "triton":
        from ..kernels.dropout import dropout_apply

        check_backend_dtype("triton", x.dtype, "x")
        return dropout_apply(x, p, seed, rng_offset)
    return _aten_dropout(x, p, seed, rng_offset)


@dropout_replay.register_fake
def _(x, p, seed, rng_offset, backend):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    _, ctx.p, ctx.seed, ctx.rng_offset, ctx.backend = inputs


def _backward(ctx, grad):
    return dropout_replay(grad, ctx.p, ctx.seed, ctx.rng_offset, ctx.backend), None, None, None, None


dropout_replay.register_autograd(_backward, setup_context=_setup_context)


def replayed_dropout(x: Tensor, p: float, backend: str) -> Tensor:
    """``dropout(x, p)`` in training mode with a replayed mask: (seed, offset) drawn from torch's
    default generator (``torch.manual_seed`` reproduces it). p == 0 returns x itself."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
        raise ValueError(f"dropout probability must be a number in [0, 1), got {p!r}")
    if p == 0:
        return x
    seed, offset = draw_dropout_seed()
    return dropout_replay(x, float(p), seed, offset, backend)


# --------------------------------------------------------------------------- eager references
def dropout_like_fused(x: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """``torch.nn.functional.dropout`` drawing what the fused ops draw: one (seed, offset) from
    torch's default generator per call, the attention-probability mask of
    :func:`fused_ckpt.ops.attention.dropout_keep_mask` for a 4-D input (read as probabilities
    [B, H, S_q, S_kv]) and the elementwise mask of :func:`dropout_keep` otherwise. For tests:
    an eager model run under :func:`fused_dropout_masks` after ``torch.manual_seed(s)`` uses the
    masks a fused model run after ``torch.manual_seed(s)`` uses, call for call (when the two
    make their dropout calls in the same order). Differentiable (a plain product)."""
    from .attention import dropout_keep_mask

    if not training or p == 0:
        return x
    seed, off = draw_dropout_seed()
    if x.dim() == 4:
        B, H, S_q, S_kv = x.shape
        keep = dropout_keep_mask(seed, off, p, B, H, torch.arange(S_q, device=x.device),
                                 torch.arange(S_kv, device=x.device))
    else:
        keep = dropout_keep(seed, off, p, 0, x.numel(), x.device).view(x.shape)
    return x * keep * (1.0 / (1.0 - p))


@contextlib.contextmanager
def fused_dropout_masks():
    """Within the block, ``torch.nn.functional.dropout`` (and so ``nn.Dropout``) is
    :func:`dropout_like_fused`: eager references (e.g. unpatched Hugging Face GPT-2 in train
    mode) then drop exactly what the fused ops drop."""
    saved = F.dropout
    F.dropout = dropout_like_fused
    try:
        yield
    finally:
        F.dropout = saved
