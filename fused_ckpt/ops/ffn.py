"""The fused FFN as ``torch.library`` custom ops with autograd: the recompute contract.

    y = act(x W1^T + b1) W2^T + b2        (gated: act(G) * U, with [G | U] = x W1^T + b1)

Gated weights come in either layout, read where they live: one packed ``w1`` ``[2f, d]`` (gate
rows, then up rows; Phi-3's ``gate_up_proj``, :class:`FusedCheckpointedFFN`'s ``fc1``), or the
gate weight as ``w1`` ``[f, d]`` and the up weight as ``w1_up`` ``[f, d]`` (Llama's
``gate_proj`` / ``up_proj``; biases ``b1`` / ``b1_up``). The kernels take two weight pointers
with their own strides either way (a packed weight is passed as two row views), so weights are
never concatenated; separate weights get separate gradients (dWg, dWu). Z keeps its layout
``[tokens, 2f]`` (gate columns, then up columns) in both cases.

Recompute contract (``recompute`` is the dial the planner sets):

===========  ====================================  =========================================
recompute    saved for backward                    recomputed in backward
===========  ====================================  =========================================
True         x  (plus the parameters W1, b1, W2)   Z = x W1^T + b1 (GEMM, in registers),
                                                   H = act(Z), act'(Z)
False        x, Z  (plus the parameters)           H = act(Z), act'(Z) (elementwise only)
"none"       x, Z, H  (what eager autograd keeps)  act'(Z) only (no checkpointing; fastest)
===========  ====================================  =========================================

The op takes the dial as ``save`` = how many tensors besides x are kept: 0 (True), 1 (False),
2 ("none").

Everything kept goes through ``ctx.save_for_backward``; parameters are saved as the same
tensors the module holds (no copies), so ``saved_tensors_hooks`` see exactly x (and Z) as
the non-parameter bytes. Under ``no_grad`` / ``inference_mode`` nothing is saved and Z is
never written.

Backward, per chunk of ``chunk_tokens`` tokens (bounding the [tokens, d_ff] temporaries):

    dZ, H = hidden_grad(x, dY)           one fused kernel: dH = dY W2 and Z = x W1^T + b1
                                         in the same pass over d_model, then dZ = dH act'(Z)
    dW2 += dY^T H       dW1 += dZ^T x    fp32 (fp64 for fp64) accumulators when there is more
                                         than one chunk
    db1 += sum(dZ)      dX = dZ W1       bias sums in fp32 (fp64 for fp64); db2 = sum(dY) once

Gradients nobody asked for (frozen weights, LoRA base weights, inputs without grad) are
neither computed nor allocated.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ..activations import get_activation
from ..backend import check_backend_dtype
from ._autograd import guard_double_backward
from ._ffn_backends import FFN_BACKENDS

# Backward temporaries (dZ and H of one chunk) are kept under this many bytes unless the
# fp32 dW accumulators that chunking needs would be larger than what chunking saves.
CHUNK_TEMP_BYTES = 256 * 2**20
CHUNK_ROUND = 128  # chunks are whole 128-row tiles of the GEMMs that follow


def default_chunk_tokens(d_model: int, fc1_rows: int, d_ff: int, elem_size: int) -> int:
    """Tokens per backward chunk when the caller passes ``chunk_tokens=0``.

    Per token the chunk holds dZ and H: (fc1_rows + d_ff) * elem_size bytes. Splitting into
    several chunks costs fp32 dW accumulators of 4 * (fc1_rows + d_ff) * d_model bytes, so a
    chunk is never made smaller than the size at which its temporaries equal those
    accumulators (below that, chunking would raise the peak instead of lowering it).
    """
    per_token = (fc1_rows + d_ff) * elem_size
    by_budget = CHUNK_TEMP_BYTES // max(per_token, 1)
    break_even = (4 * d_model) // max(elem_size, 1)
    tokens = max(by_budget, break_even)
    return max(CHUNK_ROUND, tokens // CHUNK_ROUND * CHUNK_ROUND)


def ffn_saved_bytes(tokens: int, d_model: int, d_ff: int, gated: bool, save: int,
                    elem_size: int) -> int:
    """Bytes the op keeps for backward besides parameters: x, plus Z when save >= 1, plus H
    when save == 2 (the contract above; tests check it against saved_tensors_hooks)."""
    fc1_rows = 2 * d_ff if gated else d_ff
    per_token = d_model + (fc1_rows if save >= 1 else 0) + (d_ff if save == 2 else 0)
    return tokens * per_token * elem_size


def ffn_recompute_flops(tokens: int, d_model: int, d_ff: int, gated: bool, save: int) -> int:
    """GEMM FLOPs the backward spends on recomputation (Z = x W1^T when save == 0)."""
    fc1_rows = 2 * d_ff if gated else d_ff
    return 2 * tokens * d_model * fc1_rows if save == 0 else 0


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator dtype for sums over tokens: fp32 for the half types and fp32, fp64 for fp64."""
    return torch.promote_types(dtype, torch.float32)


def _empty(ref: Tensor) -> Tensor:
    """Placeholder for an output that was not asked for (custom ops return tensors only)."""
    return ref.new_empty((0,))


# --------------------------------------------------------------------------- forward
def _fc1_rows(w1: Tensor, w1_up: Optional[Tensor]) -> int:
    return w1.shape[0] + (w1_up.shape[0] if w1_up is not None else 0)


def ffn_forward_impl(
    x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
    activation: str, save: int, chunk_tokens: int, backend: str,
    w1_up: Optional[Tensor] = None, b1_up: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (y, z, h): y has x's shape; z, the pre-activation [tokens, fc1_rows], when
    ``save >= 1``, h, the hidden activation [tokens, d_ff], when ``save == 2``; an empty
    placeholder otherwise. ``w1_up`` / ``b1_up``: the up weight and bias of a gated FFN whose
    gate weight is ``w1`` (None: ``w1`` is packed, or the FFN is ungated)."""
    act = get_activation(activation)
    check_backend_dtype(backend, x.dtype, "x")
    be = FFN_BACKENDS[backend]
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    M = x2.shape[0]
    y = torch.empty(x.shape[:-1] + (w2.shape[0],), device=x.device, dtype=x.dtype)
    y2 = y.view(M, w2.shape[0])  # returned in its final shape, not as a view (FSDP2 warns on views)
    F1 = _fc1_rows(w1, w1_up)
    if save == 2:  # Z and H are both kept: nothing to bound by chunking
        h, z = be.up(x2, w1, b1, w1_up, b1_up, act, True)
        be.down(h, w2, b2, y2)
        return y, z, h
    z = torch.empty((M, F1), device=x.device, dtype=x.dtype) if save == 1 else None
    chunk = chunk_tokens or default_chunk_tokens(d, F1, w2.shape[1], x.element_size())
    for start in range(0, M, chunk):
        end = min(start + chunk, M)
        h, zc = be.up(x2[start:end], w1, b1, w1_up, b1_up, act, z is not None)
        if z is not None:
            z[start:end] = zc
        be.down(h, w2, b2, y2[start:end])
        del h, zc
    return y, (z if z is not None else _empty(x)), _empty(x)


ffn_forward = torch.library.custom_op("fused_ckpt::ffn_forward", mutates_args=())(ffn_forward_impl)


@ffn_forward.register_fake
def _(x, w1, b1, w2, b2, activation, save, chunk_tokens, backend, w1_up=None, b1_up=None):
    y = x.new_empty(x.shape[:-1] + (w2.shape[0],))
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    z = x.new_empty((tokens, _fc1_rows(w1, w1_up))) if save >= 1 else x.new_empty((0,))
    h = x.new_empty((tokens, w2.shape[1])) if save == 2 else x.new_empty((0,))
    return y, z, h


# --------------------------------------------------------------------------- backward
def ffn_backward_impl(
    dy: Tensor, x: Tensor, z: Optional[Tensor], h: Optional[Tensor], w1: Tensor,
    b1: Optional[Tensor], w2: Tensor, activation: str, needs_grad: list[bool], chunk_tokens: int,
    backend: str, w1_up: Optional[Tensor] = None, b1_up: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dx, dw1, db1, dw2, db2, dw1_up, db1_up); ``needs_grad`` flags them in that order
    (five flags: the last two are False) and an unflagged one comes back as an empty
    placeholder. ``z`` None: recompute it from x; ``h`` None: recompute it (from z) where dW2
    needs it."""
    need_x, need_w1, need_b1, need_w2, need_b2, need_w1u, need_b1u = (list(needs_grad) + [False, False])[:7]
    act = get_activation(activation)
    check_backend_dtype(backend, x.dtype, "x")
    be = FFN_BACKENDS[backend]
    split = w1_up is not None
    need_w1u, need_b1u = need_w1u and split, need_b1u and split and b1_up is not None
    d = x.shape[-1]
    F1, f = _fc1_rows(w1, w1_up), w2.shape[1]
    x2 = x.reshape(-1, d)
    dy2 = dy.reshape(-1, d)
    z2 = z.reshape(-1, F1) if z is not None else None
    h2 = h.reshape(-1, f) if h is not None else None
    M = x2.shape[0]
    chunk = chunk_tokens or default_chunk_tokens(d, F1, f, x.element_size())
    n_chunks = -(-M // chunk)
    acc = acc_dtype(w1.dtype)
    dw_dtype = acc if n_chunks > 1 else w1.dtype
    dev = x.device

    dx = torch.empty(x.shape, device=dev, dtype=x.dtype) if need_x else None
    dx2 = dx.view(M, d) if need_x else None
    # the first chunk overwrites dW (accumulate=False); only an empty batch needs zeros
    new_dw = torch.zeros if M == 0 else torch.empty
    dw1 = new_dw(w1.shape, device=dev, dtype=dw_dtype) if need_w1 else None
    dw1u = new_dw(w1_up.shape, device=dev, dtype=dw_dtype) if need_w1u else None
    dw2 = new_dw(w2.shape, device=dev, dtype=dw_dtype) if need_w2 else None
    db1 = torch.zeros((w1.shape[0],), device=dev, dtype=acc) if need_b1 else None
    db1u = torch.zeros((f,), device=dev, dtype=acc) if need_b1u else None
    need_dz = need_x or need_w1 or need_b1 or need_w1u or need_b1u
    # separate gate/up weights in a 16-bit dtype: dX = dG Wg + dU Wu summed in fp32, rounded once
    dx_acc = None
    if need_x and split and x.dtype not in (torch.float32, torch.float64):
        dx_acc = torch.empty((min(chunk, M), d), device=dev, dtype=torch.float32)

    for i, start in enumerate(range(0, M, chunk)):
        end = min(start + chunk, M)
        xc, dyc = x2[start:end], dy2[start:end]
        zc = z2[start:end] if z2 is not None else None
        hc = h2[start:end] if h2 is not None else None
        if need_dz:
            dz, hh = be.hidden_grad(xc, zc, dyc, w1, b1, w1_up, b1_up, w2, act, need_w2 and hc is None)
            hc = hc if hc is not None else hh
        else:  # only dW2 wanted: H alone, no dH GEMM
            dz = None
            if hc is None:
                hc = act.hidden(zc) if zc is not None else be.up(xc, w1, b1, w1_up, b1_up, act, False)[0]
        if need_w2:
            be.mm(dyc.t(), hc, dw2, accumulate=i > 0)
        dz_g, dz_u = (dz[:, :f], dz[:, f:]) if split and dz is not None else (dz, None)
        if need_w1:
            be.mm(dz_g.t(), xc, dw1, accumulate=i > 0)
        if need_w1u:
            be.mm(dz_u.t(), xc, dw1u, accumulate=i > 0)
        if need_b1:
            db1 += dz_g.sum(0, dtype=acc)
        if need_b1u:
            db1u += dz_u.sum(0, dtype=acc)
        if need_x and not split:
            be.mm(dz, w1, dx2[start:end], accumulate=False)
        elif need_x:
            out = dx_acc[:end - start] if dx_acc is not None else dx2[start:end]
            be.mm(dz_g, w1, out, accumulate=False)
            be.mm(dz_u, w1_up, out, accumulate=True)
            if dx_acc is not None:
                dx2[start:end].copy_(out)
        del dz, dz_g, dz_u, hc

    out_dx = dx if need_x else _empty(x)
    out_dw1 = dw1.to(w1.dtype) if need_w1 else _empty(w1)
    out_db1 = db1.to(b1.dtype) if need_b1 else _empty(w1)
    out_dw2 = dw2.to(w2.dtype) if need_w2 else _empty(w2)
    out_db2 = dy2.sum(0, dtype=acc_dtype(dy.dtype)).to(dy.dtype) if need_b2 else _empty(w2)
    out_dw1u = dw1u.to(w1_up.dtype) if need_w1u else _empty(w1)
    out_db1u = db1u.to(b1_up.dtype) if need_b1u else _empty(w1)
    return out_dx, out_dw1, out_db1, out_dw2, out_db2, out_dw1u, out_db1u


ffn_backward = torch.library.custom_op("fused_ckpt::ffn_backward", mutates_args=())(ffn_backward_impl)


@ffn_backward.register_fake
def _(dy, x, z, h, w1, b1, w2, activation, needs_grad, chunk_tokens, backend, w1_up=None, b1_up=None):
    need_x, need_w1, need_b1, need_w2, need_b2, need_w1u, need_b1u = (list(needs_grad) + [False, False])[:7]
    e = lambda t: t.new_empty((0,))  # noqa: E731
    return (
        x.new_empty(x.shape) if need_x else e(x),
        w1.new_empty(w1.shape) if need_w1 else e(w1),
        b1.new_empty(b1.shape) if need_b1 else e(w1),
        w2.new_empty(w2.shape) if need_w2 else e(w2),
        dy.new_empty((w2.shape[0],)) if need_b2 else e(w2),
        w1_up.new_empty(w1_up.shape) if need_w1u and w1_up is not None else e(w1),
        b1_up.new_empty(b1_up.shape) if need_b1u and w1_up is not None and b1_up is not None else e(w1),
    )


# --------------------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, activation, save, chunk_tokens, backend, w1_up, b1_up = tuple(inputs) + (None,) * (11 - len(inputs))
    _, z, h = output
    ctx.save_for_backward(x, w1, b1, w2, z if save >= 1 else None, h if save == 2 else None, w1_up, b1_up)
    ctx.activation = activation
    ctx.chunk_tokens = chunk_tokens
    ctx.backend = backend


def _backward(ctx, grad_y, grad_z, grad_h):
    x, w1, b1, w2, z, h, w1_up, b1_up = ctx.saved_tensors
    flags = tuple(ctx.needs_input_grad) + (False,) * (11 - len(ctx.needs_input_grad))
    needs = [flags[i] for i in (0, 1, 2, 3, 4, 9, 10)]
    with torch.no_grad():
        grads = ffn_backward(grad_y, x, z, h, w1, b1, w2, ctx.activation, needs, ctx.chunk_tokens,
                             ctx.backend, w1_up, b1_up)
    grads = guard_double_backward(grads, (grad_y, x, w1, b1, w2, w1_up, b1_up), "FFN")
    grads = tuple(g if n else None for g, n in zip(grads, needs))
    return grads[:5] + (None, None, None, None) + grads[5:7][:len(ctx.needs_input_grad) - 9]


ffn_forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- FLOP formulas
# FlopCounterMode cannot see inside a custom op, so each op states the GEMM FLOPs its
# implementation performs (tests check these against the aten path's counted GEMMs).
@register_flop_formula(torch.ops.fused_ckpt.ffn_forward)
def _ffn_forward_flops(x_shape, w1_shape, b1_shape, w2_shape, *args, out_shape=None, **kwargs) -> int:
    tokens = math.prod(x_shape[:-1])
    w1_up_shape = kwargs.get("w1_up", args[5] if len(args) > 5 else None)
    F1 = w1_shape[0] + (w1_up_shape[0] if w1_up_shape is not None else 0)
    return 2 * tokens * w1_shape[1] * (F1 + w2_shape[1])


@register_flop_formula(torch.ops.fused_ckpt.ffn_backward)
def _ffn_backward_flops(dy_shape, x_shape, z_shape, h_shape, w1_shape, b1_shape, w2_shape,
                        activation, needs_grad, *args, out_shape=None, **kwargs) -> int:
    need_x, need_w1, need_b1, need_w2, _, need_w1u, need_b1u = (list(needs_grad) + [False, False])[:7]
    w1_up_shape = kwargs.get("w1_up", args[2] if len(args) > 2 else None)
    tokens = math.prod(x_shape[:-1])
    d, f = w1_shape[1], w2_shape[1]
    F1 = w1_shape[0] + (w1_up_shape[0] if w1_up_shape is not None else 0)
    need_w1u, need_b1u = need_w1u and w1_up_shape is not None, need_b1u and w1_up_shape is not None
    need_dz = need_x or need_w1 or need_b1 or need_w1u or need_b1u
    flops = 0
    if z_shape is None and (need_dz or (need_w2 and h_shape is None)):
        flops += 2 * tokens * d * F1  # recompute Z = x W1^T
    if need_dz:
        flops += 2 * tokens * d * f  # dH = dY W2
    if need_w2:
        flops += 2 * tokens * d * f  # dW2 = dY^T H
    if need_w1:
        flops += 2 * tokens * d * w1_shape[0]  # dW1 = dZ^T x (separate gate/up: dWg = dG^T x)
    if need_w1u:
        flops += 2 * tokens * d * w1_up_shape[0]  # dWu = dU^T x
    if need_x:
        flops += 2 * tokens * d * F1  # dX = dZ W1 (separate: dG Wg + dU Wu)
    return flops
