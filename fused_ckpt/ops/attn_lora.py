"""The attention block with LoRA adapters on its projections and frozen base weights (PEFT's vanilla LoRA).

Per projection ``p`` -- q (or the packed q/k/v weight), k, v, o -- with LoRA factors
``A_p [r, in]``, ``B_p [out, r]`` and ``scaling_p``::

    z_p = in_p W_p^T + b_p + scaling_p * (drop_p(in_p) A_p^T) B_p^T

with ``in_p = x`` for q/k/v (or the packed weight, whose ``B`` has the packed rows, in the
weight's own row order) and ``in_o = o``, the attention output ``[tokens, n_heads * head_dim]``
before o_proj; ``y = z_o``. That is PEFT's ``lora.Linear`` (``base(x) + lora_B(lora_A(dropout(x)))
* scaling``); the rest of the block is :func:`fused_ckpt.ops.attention.attn_block_forward`'s (GQA,
rotary / partial rotary, QK-norm of both kinds, packed / neox / Conv1D-transposed layouts,
softcap, sliding window, attention dropout, key padding mask). A projection without an adapter
passes None for both factors.

Signatures (flat optional factors: a ``Tensor?[]`` list argument loses autograd for its elements
as soon as one of them is None -- torch.library's tensor-list support treats such a list as one
leaf -- so the four A and four B factors are eight optional tensors, in the order of the lists
``lora_a = [A_q, A_k, A_v, A_o]``, ``lora_b = [B_q, B_k, B_v, B_o]``: a caller passes
``*lora_a, *lora_b``)::

    fused_ckpt::attn_lora_forward(x, wq, bq, wk, bk, wv, bv, wo, bo,
        a_q, a_k, a_v, a_o, b_q, b_k, b_v, b_o, scalings: float[4],
        position_ids, key_padding_mask, n_heads, n_kv_heads, causal, scale, rope_theta, mode, backend,
        q_norm=None, k_norm=None, qk_norm_eps=1e-6, qk_norm_offset=0.0, rotary_dim=None,
        qkv_layout="separate", softcap=None, window=None, dropout_p=0.0, seed=0, rng_offset=0,
        lora_dropout_p=0.0, lora_seed=0, lora_offset=0)
      -> (y, o, lse, q, k, v, t_q, t_k, t_v, t_o)

    fused_ckpt::attn_lora_backward(dy, x, wq, bq, wk, bk, wv, bv, wo, q, k, v, o, lse,
        t_q, t_k, t_v, t_o, a_q, a_k, a_v, a_o, b_q, b_k, b_v, b_o, scalings,
        position_ids, key_padding_mask, n_heads, n_kv_heads, causal, scale, rope_theta,
        needs_grad: bool[9], backend, <the same feature keywords>, lora_dropout_p=0.0, lora_seed=0,
        lora_offset=0)
      -> (dx, dA_q, dB_q, dA_k, dB_k, dA_v, dB_v, dA_o, dB_o)

``needs_grad`` flags the nine outputs in that order; unflagged ones and those of absent adapters
come back as empty placeholders. q, k, v None: recomputed (projections with the LoRA terms from
the kept t, QK-norm, rotary); o None: recomputed with the attention forward kernel.

Recompute contract (``t_p = drop_p(in_p) A_p^T``, ``[tokens, r_p]`` in the factors' dtype, one per
adapter):

======  =================================================  ===========================================
mode    kept for backward (besides parameters)             recomputed in backward
======  =================================================  ===========================================
"all"   x, lse, the t_p, the dropout seeds (ints)          q, k, v (base GEMMs + ``scaling t B^T``
                                                           from the kept t, QK-norm, rotary), o (the
                                                           forward kernel), the dropout masks; then P
"qkv"   x, o, lse, the t_p                                 q, k, v as above, the masks; P
"none"  x, q, k, v (with QK-norm: before it), o, lse,      QK-norm and rotary when there is a QK-norm;
        the t_p                                            the masks; P
======  =================================================  ===========================================

plus ``position_ids`` / ``key_padding_mask`` when given. The base weights, biases and QK-norm
weights are frozen: no gradient is computed or allocated for them; the op returns dx and dA, dB per
adapter. LoRA dropout (``lora_dropout_p``, one p for all adapters of the call) draws an independent
keep mask per projection from a Philox (lora_seed, lora_offset) drawn from torch's default generator
-- the bits of :func:`fused_ckpt.ops.dropout.dropout_keep` over the ``[tokens, in]`` input's
row-major index at offsets ``lora_offset + 0/1/2/3`` (q or packed, k, v, o), as the FFN's LoRA op
draws them -- and the backward regenerates exactly those masks; no mask is kept (the masks are not
the ones ``torch.nn.Dropout`` would draw: same distribution, different bits).

Backends: the attention core, rotary and QK-norm run on ``backend`` (:data:`ATTN_BACKENDS`: "aten"
or "triton"); the projections and the rank-r GEMMs are torch GEMMs on every device. Backward::

    dB_o = scaling_o dY^T t_o      g_o = dY B_o      dA_o = scaling_o g_o^T drop_o(o)
    dO   = dY W_o + drop_o'(scaling_o g_o A_o)
    dq, dk, dv = attention backward (then inverse rotary, QK-norm backward) -> dZ_p
    dB_p = scaling_p dZ_p^T t_p    g_p = dZ_p B_p    dA_p = scaling_p g_p^T drop_p(x)
    dX   = sum_p dZ_p W_p + sum_p drop_p'(scaling_p g_p A_p)

With LoRA dropout the rank-r products run over row chunks of at most ``ATEN_CHUNK`` elements (the
masks' Philox temporaries stay bounded; without dropout, one pass); LoRA gradients are accumulated
in fp32 (fp64 for fp64) and rounded once.
Neither op supports double backward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from .attention import (ATTN_BACKENDS, AttnOptions, _attn_bwd_flops, _attn_fwd_flops, _block_qk_shapes,
                        _core_backward, _empty, _Feats, _heads, _mode_outputs, _no_double_backward, _proj_flops,
                        _qk_ready, _tables, _two_kernel_backward, lse_dtype)
from .dropout import ATEN_CHUNK
from .ffn_lora import _acc, _add, _add_low_rank, _drop, _keep

# the adapters, in the order of the op's factor lists and the rng offsets of their masks
LORA_ROLES = ("q", "k", "v", "o")
_Q, _K, _V, _O = range(4)
N_GRADS = 9  # dx, dA_q, dB_q, dA_k, dB_k, dA_v, dB_v, dA_o, dB_o


def _rows(n: int) -> int:
    """Rows per chunk of a ``[tokens, n]`` operand of the rank-r products."""
    return max(1, ATEN_CHUNK // max(n, 1))


def _lora_t(inp: Tensor, a: Tensor, p: float, seed: int, offset: int) -> Tensor:
    """t = drop(inp) A^T ``[tokens, r]`` in A's dtype (inp cast to it first, as PEFT casts its
    input to the adapter's dtype before the dropout); inp ``[tokens, n]``."""
    if p == 0:
        return torch.mm(inp.to(a.dtype), a.t())
    M, n = inp.shape
    t = inp.new_empty((M, a.shape[0]), dtype=a.dtype)
    step = _rows(n)
    for s in range(0, M, step):
        e = min(s + step, M)
        t[s:e] = torch.mm(_drop(inp[s:e].to(a.dtype), _keep(seed, offset, p, s, e, n, inp.device), p), a.t())
    return t


def _lora_grads(dz: Tensor, inp: Optional[Tensor], t: Tensor, a: Tensor, b: Tensor, scaling: float, p: float,
                seed: int, offset: int, need_a: bool, need_b: bool, need_in: bool):
    """(dA, dB, the term the adapter adds to d(inp)) of ``z += scaling (drop(inp) A^T) B^T`` for
    the upstream gradient dz ``[tokens, out]``: dB = scaling dz^T t, g = dz B, dA = scaling
    g^T drop(inp), d(inp) term = drop'(scaling g A) in the factors' dtype. Each None when not
    asked for; accumulated over row chunks in fp32 (fp64 for fp64), rounded once."""
    M = dz.shape[0]
    acc = lse_dtype(a.dtype)
    dA = torch.zeros(a.shape, device=dz.device, dtype=acc) if need_a else None
    dB = torch.zeros(b.shape, device=dz.device, dtype=acc) if need_b else None
    term = dz.new_empty((M, a.shape[1]), dtype=a.dtype) if need_in else None
    n = a.shape[1]
    step = _rows(max(n, b.shape[0])) if p > 0 else max(M, 1)  # without dropout: one pass, no mask temporaries
    for s in range(0, M, step):
        e = min(s + step, M)
        dzc = dz[s:e]
        if need_b:
            _acc(dB, dzc.t().to(acc), t[s:e].to(acc), scaling)
        if not (need_a or need_in):
            continue
        keep = _keep(seed, offset, p, s, e, n, dz.device) if p > 0 else None
        g = torch.mm(dzc.to(b.dtype), b)  # [rows, r]
        if need_a:
            _acc(dA, g.t().to(acc), _drop(inp[s:e].to(a.dtype), keep, p).to(acc), scaling)
        if need_in:
            term[s:e] = _drop(torch.mm(g, a) * scaling, keep, p)
    return (dA.to(a.dtype) if need_a else None), (dB.to(b.dtype) if need_b else None), term


def _projections(x: Tensor, wq, bq, wk, bk, wv, bv, lora, ts, scalings, n_heads: int, n_kv_heads: int,
                 head_dim: int, qkv_layout: str):
    """q, k, v ``[B, S, heads, D]`` from the projections with their LoRA terms (no norm, no
    rotary), each a fresh contiguous tensor; the LoRA term ``scaling t B^T`` comes from the given
    t (so a recompute from the kept t is bit-identical to the forward)."""
    B, S, _ = x.shape
    M = B * S

    def proj(w, bias, i):
        z = F.linear(x, w, bias)
        if lora[i][0] is not None:
            _add_low_rank(z.view(M, w.shape[0]), ts[i], lora[i][1], scalings[i])
        return z

    if qkv_layout == "separate":
        return (_heads(proj(wq, bq, _Q), n_heads), _heads(proj(wk, bk, _K), n_kv_heads),
                _heads(proj(wv, bv, _V), n_kv_heads))
    qkv = proj(wq, bq, _Q)  # one adapter on the packed weight: B has the packed rows
    if qkv_layout == "neox":
        q, k, v = qkv.view(B, S, n_heads, 3, head_dim).unbind(3)
    else:
        parts = qkv.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], -1)
        q, k, v = (_heads(t, n) for t, n in zip(parts, (n_heads, n_kv_heads, n_kv_heads)))
    return tuple(t.clone(memory_format=torch.contiguous_format) for t in (q, k, v))


def _check_factors(lora, qkv_layout: str) -> None:
    for i, (a, b) in enumerate(lora):
        if (a is None) != (b is None):
            raise ValueError(f"attn_lora_forward: the {LORA_ROLES[i]} adapter has only one of its factors A, B")
    if qkv_layout != "separate" and (lora[_K][0] is not None or lora[_V][0] is not None):
        raise ValueError(f"attn_lora_forward: qkv_layout={qkv_layout!r} has one adapter on the packed weight (the q "
                         "factors); the k and v factors must be None")


def _x_ts(x2: Tensor, lora, p: float, seed: int, offset: int) -> list:
    """The t of the q/k/v (or packed) adapters (None where there is none)."""
    return [_lora_t(x2, lora[i][0], p, seed, offset + i) if lora[i][0] is not None else None
            for i in (_Q, _K, _V)]


# --------------------------------------------------------------------------- forward
def attn_lora_forward_impl(
    x: Tensor, wq: Tensor, bq: Optional[Tensor], wk: Optional[Tensor], bk: Optional[Tensor],
    wv: Optional[Tensor], bv: Optional[Tensor], wo: Tensor, bo: Optional[Tensor],
    a_q: Optional[Tensor], a_k: Optional[Tensor], a_v: Optional[Tensor], a_o: Optional[Tensor],
    b_q: Optional[Tensor], b_k: Optional[Tensor], b_v: Optional[Tensor], b_o: Optional[Tensor],
    scalings: list[float], position_ids: Optional[Tensor], key_padding_mask: Optional[Tensor],
    n_heads: int, n_kv_heads: int, causal: bool, scale: float, rope_theta: Optional[float],
    mode: str, backend: str,
    q_norm: Optional[Tensor] = None, k_norm: Optional[Tensor] = None, qk_norm_eps: float = 1e-6,
    qk_norm_offset: float = 0.0, rotary_dim: Optional[int] = None, qkv_layout: str = "separate",
    softcap: Optional[float] = None, window: Optional[int] = None, dropout_p: float = 0.0, seed: int = 0,
    rng_offset: int = 0, lora_dropout_p: float = 0.0, lora_seed: int = 0, lora_offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, o or empty, lse, q, k, v or empty, t_q, t_k, t_v, t_o or empty); see the module
    docstring for which outputs each mode fills (as :func:`attn_block_forward`)."""
    be = ATTN_BACKENDS[backend]
    B, S, d = x.shape
    M = B * S
    lora = ((a_q, b_q), (a_k, b_k), (a_v, b_v), (a_o, b_o))
    _check_factors(lora, qkv_layout)
    feats = _Feats(wo, n_heads, qkv_layout, q_norm, k_norm, qk_norm_eps, qk_norm_offset, backend)
    tables = _tables(x, feats.head_dim, position_ids, rope_theta, rotary_dim)
    p, ls, lo = lora_dropout_p, lora_seed, lora_offset
    ts = _x_ts(x.reshape(M, d), lora, p, ls, lo)
    q, k, v = _projections(x, wq, bq, wk, bk, wv, bv, lora, ts, scalings, n_heads, n_kv_heads,
                           feats.head_dim, qkv_layout)
    q, k, q0, k0, _, _ = _qk_ready(be, q, k, True, q_norm, k_norm, qk_norm_eps, qk_norm_offset, backend, tables)
    o, lse = be.forward(q, k, v, key_padding_mask, causal, scale,
                        AttnOptions(softcap, window, dropout_p, seed, rng_offset))
    o = o.view(B, S, n_heads * feats.head_dim)
    y = F.linear(o, wo, bo)
    t_o = None
    if a_o is not None:
        t_o = _lora_t(o.view(M, o.shape[-1]), a_o, p, ls, lo + _O)
        _add_low_rank(y.view(M, wo.shape[0]), t_o, b_o, scalings[_O])
    out_ts = tuple(t if t is not None else _empty(x) for t in ts + [t_o])
    return _mode_outputs(mode, x, y, o, lse, q, k, v, q0, k0) + out_ts


attn_lora_forward = torch.library.custom_op("fused_ckpt::attn_lora_forward", mutates_args=())(attn_lora_forward_impl)


@attn_lora_forward.register_fake
def _(x, wq, bq, wk, bk, wv, bv, wo, bo, a_q, a_k, a_v, a_o, b_q, b_k, b_v, b_o, scalings, position_ids,
      key_padding_mask, n_heads, n_kv_heads, causal, scale, rope_theta, mode, backend, q_norm=None, k_norm=None,
      qk_norm_eps=1e-6, qk_norm_offset=0.0, rotary_dim=None, qkv_layout="separate", softcap=None, window=None,
      dropout_p=0.0, seed=0, rng_offset=0, lora_dropout_p=0.0, lora_seed=0, lora_offset=0):
    B, S, _ = x.shape
    D = wo.shape[1] // n_heads
    y = x.new_empty((B, S, wo.shape[0]))
    o = x.new_empty((B, S, n_heads * D)) if mode != "all" else x.new_empty((0,))
    lse = x.new_empty((B, n_heads, S), dtype=lse_dtype(x.dtype))
    ts = tuple(x.new_empty((B * S, a.shape[0]), dtype=a.dtype) if a is not None else x.new_empty((0,))
               for a in (a_q, a_k, a_v, a_o))
    if mode == "none":
        return (y, o, lse, x.new_empty((B, S, n_heads, D)), x.new_empty((B, S, n_kv_heads, D)),
                x.new_empty((B, S, n_kv_heads, D))) + ts
    return (y, o, lse, x.new_empty((0,)), x.new_empty((0,)), x.new_empty((0,))) + ts


# --------------------------------------------------------------------------- backward
def attn_lora_backward_impl(
    dy: Tensor, x: Tensor, wq: Tensor, bq: Optional[Tensor], wk: Optional[Tensor], bk: Optional[Tensor],
    wv: Optional[Tensor], bv: Optional[Tensor], wo: Tensor,
    q: Optional[Tensor], k: Optional[Tensor], v: Optional[Tensor], o: Optional[Tensor], lse: Tensor,
    t_q: Optional[Tensor], t_k: Optional[Tensor], t_v: Optional[Tensor], t_o: Optional[Tensor],
    a_q: Optional[Tensor], a_k: Optional[Tensor], a_v: Optional[Tensor], a_o: Optional[Tensor],
    b_q: Optional[Tensor], b_k: Optional[Tensor], b_v: Optional[Tensor], b_o: Optional[Tensor],
    scalings: list[float], position_ids: Optional[Tensor], key_padding_mask: Optional[Tensor],
    n_heads: int, n_kv_heads: int, causal: bool, scale: float, rope_theta: Optional[float],
    needs_grad: list[bool], backend: str,
    q_norm: Optional[Tensor] = None, k_norm: Optional[Tensor] = None, qk_norm_eps: float = 1e-6,
    qk_norm_offset: float = 0.0, rotary_dim: Optional[int] = None, qkv_layout: str = "separate",
    softcap: Optional[float] = None, window: Optional[int] = None, dropout_p: float = 0.0, seed: int = 0,
    rng_offset: int = 0, lora_dropout_p: float = 0.0, lora_seed: int = 0, lora_offset: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA_q, dB_q, dA_k, dB_k, dA_v, dB_v, dA_o, dB_o) flagged by ``needs_grad``; see the
    module docstring. q, k, v None: recomputed from x and the kept t; given with QK-norm: the
    projections before the norm (as the forward's "none" mode returns them). o None: recomputed."""
    lora = ((a_q, b_q), (a_k, b_k), (a_v, b_v), (a_o, b_o))
    ts = [t_q, t_k, t_v, t_o]
    needs = [bool(n) for n in needs_grad]
    if len(needs) != N_GRADS:
        raise ValueError(f"attn_lora_backward: needs_grad must have {N_GRADS} flags, got {len(needs)}")
    for i, (a, _) in enumerate(lora):  # no gradient for an absent adapter
        if a is None:
            needs[1 + 2 * i] = needs[2 + 2 * i] = False
    need_x = needs[0]
    need_qkv_lora = any(needs[1:7])
    need_attn = need_x or need_qkv_lora
    need_ao, need_bo = needs[7], needs[8]
    be = ATTN_BACKENDS[backend]
    feats = _Feats(wo, n_heads, qkv_layout, q_norm, k_norm, qk_norm_eps, qk_norm_offset, backend)
    B, S, d = x.shape
    M = B * S
    x2 = x.reshape(M, d)
    dy2 = dy.reshape(M, wo.shape[0])
    hd = wo.shape[1]
    tables = _tables(x, feats.head_dim, position_ids, rope_theta, rotary_dim)
    opts = AttnOptions(softcap, window, dropout_p, seed, rng_offset)
    p, ls, lo = lora_dropout_p, lora_seed, lora_offset
    q0 = k0 = rq = rk = None
    if need_attn or (o is None and need_ao):
        raw = q is None
        if raw:  # recompute: projections with the LoRA terms from the kept t, then QK-norm and rotary
            q, k, v = _projections(x, wq, bq, wk, bk, wv, bv, lora, ts, scalings, n_heads, n_kv_heads,
                                   feats.head_dim, qkv_layout)
        q, k, q0, k0, rq, rk = _qk_ready(be, q, k, raw, q_norm, k_norm, qk_norm_eps, qk_norm_offset, backend,
                                         tables)
    if o is None and (need_attn or need_ao):
        o = be.forward(q, k, v, key_padding_mask, causal, scale, opts)[0]  # same seed: same dropout mask
    out: list[Optional[Tensor]] = [None] * N_GRADS
    o2 = o.reshape(M, hd) if o is not None else None
    do_term = None
    if a_o is not None and (need_ao or need_bo or need_attn):
        out[7], out[8], do_term = _lora_grads(dy2, o2, t_o, a_o, b_o, scalings[_O], p, ls, lo + _O,
                                              need_ao, need_bo, need_attn)
    if need_attn:
        do2 = dy2.mm(wo)
        if do_term is not None:
            do2 = _add(do2, do_term)
        del do_term
        grads = _core_backward(be, _heads(do2.view(B, S, hd), n_heads), q, k, v, o, lse, key_padding_mask, causal,
                               scale, opts, tables, q0, k0, rq, rk, q_norm, k_norm, qk_norm_offset, False, False,
                               backend, qkv_layout)[0]
        del do2
        parts = zip((_Q, _K, _V), grads, (wq, wk, wv))
        dx = lora_dx = None
        for i, g, w in parts:
            g2 = g.reshape(M, w.shape[0])
            if lora[i][0] is not None:
                out[1 + 2 * i], out[2 + 2 * i], term = _lora_grads(
                    g2, x2, ts[i], lora[i][0], lora[i][1], scalings[i], p, ls, lo + i,
                    needs[1 + 2 * i], needs[2 + 2 * i], need_x)
                if term is not None:
                    lora_dx = term if lora_dx is None else lora_dx.add_(term)
            if need_x:
                if dx is None:
                    dx = g2.mm(w)
                else:
                    _acc(dx, g2, w, 1.0)
        if need_x:
            if lora_dx is not None:
                dx = _add(dx, lora_dx)
            out[0] = dx.view(x.shape)
    return tuple(t if t is not None and n else _empty(x) for t, n in zip(out, needs))


attn_lora_backward = torch.library.custom_op("fused_ckpt::attn_lora_backward",
                                             mutates_args=())(attn_lora_backward_impl)


@attn_lora_backward.register_fake
def _(dy, x, wq, bq, wk, bk, wv, bv, wo, q, k, v, o, lse, t_q, t_k, t_v, t_o, a_q, a_k, a_v, a_o, b_q, b_k, b_v,
      b_o, scalings, position_ids, key_padding_mask, n_heads, n_kv_heads, causal, scale, rope_theta, needs_grad,
      backend, q_norm=None, k_norm=None, qk_norm_eps=1e-6, qk_norm_offset=0.0, rotary_dim=None,
      qkv_layout="separate", softcap=None, window=None, dropout_p=0.0, seed=0, rng_offset=0, lora_dropout_p=0.0,
      lora_seed=0, lora_offset=0):
    out = [x.new_empty(x.shape) if needs_grad[0] else x.new_empty((0,))]
    for i, (a, b) in enumerate(((a_q, b_q), (a_k, b_k), (a_v, b_v), (a_o, b_o))):
        for j, f in enumerate((a, b)):
            out.append(f.new_empty(f.shape) if f is not None and needs_grad[1 + 2 * i + j] else x.new_empty((0,)))
    return tuple(out)


# --------------------------------------------------------------------------- autograd
# the forward op's inputs, in order (the autograd wrapper reads them by name)
_INPUTS = ("x", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "a_q", "a_k", "a_v", "a_o", "b_q", "b_k", "b_v",
           "b_o", "scalings", "position_ids", "key_padding_mask", "n_heads", "n_kv_heads", "causal", "scale",
           "rope_theta", "mode", "backend", "q_norm", "k_norm", "qk_norm_eps", "qk_norm_offset", "rotary_dim",
           "qkv_layout", "softcap", "window", "dropout_p", "seed", "rng_offset", "lora_dropout_p", "lora_seed",
           "lora_offset")
_GRAD_INPUTS = ("x", "a_q", "b_q", "a_k", "b_k", "a_v", "b_v", "a_o", "b_o")  # the backward op's outputs
_FROZEN = ("wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "q_norm", "k_norm")
_FEATURE_KW = ("qk_norm_eps", "qk_norm_offset", "rotary_dim", "qkv_layout", "softcap", "window", "dropout_p",
               "seed", "rng_offset", "lora_dropout_p", "lora_seed", "lora_offset")
_DEFAULTS = {"q_norm": None, "k_norm": None, "qk_norm_eps": 1e-6, "qk_norm_offset": 0.0, "rotary_dim": None,
             "qkv_layout": "separate", "softcap": None, "window": None, "dropout_p": 0.0, "seed": 0, "rng_offset": 0,
             "lora_dropout_p": 0.0, "lora_seed": 0, "lora_offset": 0}


def _setup_context(ctx, inputs, output):
    a = dict(_DEFAULTS)
    a.update(zip(_INPUTS, inputs))
    mode = a["mode"]
    _, o, lse, q, k, v, t_q, t_k, t_v, t_o = output
    factors = [a[n] for n in ("a_q", "a_k", "a_v", "a_o", "b_q", "b_k", "b_v", "b_o")]
    ts = [t if f is not None else None for t, f in zip((t_q, t_k, t_v, t_o), factors[:4])]
    ctx.save_for_backward(
        a["x"], a["wq"], a["bq"], a["wk"], a["bk"], a["wv"], a["bv"], a["wo"], a["position_ids"],
        a["key_padding_mask"], lse, o if mode != "all" else None,
        *((q, k, v) if mode == "none" else (None, None, None)), a["q_norm"], a["k_norm"], *ts, *factors)
    for t in output[1:]:
        ctx.mark_non_differentiable(t)
    ctx.args = (list(a["scalings"]), a["n_heads"], a["n_kv_heads"], a["causal"], a["scale"], a["rope_theta"])
    ctx.kwargs = {n: a[n] for n in _FEATURE_KW}
    ctx.backend = a["backend"]
    ctx.n_inputs = len(inputs)


def _backward(ctx, grad_y, *_unused):
    _no_double_backward("attention block with LoRA")
    (x, wq, bq, wk, bk, wv, bv, wo, position_ids, kpm, lse, o, q, k, v, q_norm, k_norm, t_q, t_k, t_v, t_o,
     *factors) = ctx.saved_tensors
    flags = dict(zip(_INPUTS, ctx.needs_input_grad))
    trainable = [n for n in _FROZEN if flags.get(n)]
    if trainable:
        raise RuntimeError(f"fused_ckpt attention LoRA op: the base weights must be frozen (requires_grad=False), as "
                           f"PEFT sets them; {', '.join(trainable)} require grad (a trainable base runs the unfused "
                           "path)")
    needs = [bool(flags.get(n, False)) for n in _GRAD_INPUTS]
    scalings, n_heads, n_kv_heads, causal, scale, rope_theta = ctx.args
    grads = attn_lora_backward(grad_y, x, wq, bq, wk, bk, wv, bv, wo, q, k, v, o, lse, t_q, t_k, t_v, t_o,
                               *factors, scalings, position_ids, kpm, n_heads, n_kv_heads, causal, scale, rope_theta,
                               needs, ctx.backend, q_norm=q_norm, k_norm=k_norm, **ctx.kwargs)
    by_name = {n: (g if f else None) for n, g, f in zip(_GRAD_INPUTS, grads, needs)}
    return tuple(by_name.get(n) for n in _INPUTS[:ctx.n_inputs])


attn_lora_forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- FLOP formulas
# FlopCounterMode cannot see inside a custom op: the GEMM FLOPs the implementation performs
# (masks by key padding are data-dependent: counted as dense; a test checks them against the
# counted GEMMs of the implementation).
def _adapter_dims(wq_shape, wk_shape, wv_shape, wo_shape, a_shapes) -> list:
    """[(index, rank, in, out)] of the adapters present."""
    ws = (wq_shape, wk_shape, wv_shape, wo_shape)
    return [(i, a[0], a[1], ws[i][0]) for i, a in enumerate(a_shapes) if a is not None]


@register_flop_formula(torch.ops.fused_ckpt.attn_lora_forward)
def _lora_forward_flops(x_shape, wq_shape, bq_shape, wk_shape, bk_shape, wv_shape, bv_shape, wo_shape, bo_shape,
                        aq_shape, ak_shape, av_shape, ao_shape, bq2_shape, bk2_shape, bv2_shape, bo2_shape, scalings,
                        pos_shape, mask_shape, n_heads, n_kv_heads, causal, *args, out_shape=None, **kwargs) -> int:
    q_shape, k_shape = _block_qk_shapes(x_shape, wo_shape, n_heads, n_kv_heads)
    T = math.prod(x_shape[:-1])
    window = kwargs.get("window", args[11] if len(args) > 11 else None)
    flops = (_proj_flops(x_shape, wq_shape, wk_shape, wv_shape) + _attn_fwd_flops(q_shape, k_shape, causal, window)
             + 2 * T * wo_shape[0] * wo_shape[1])
    for _, r, n_in, n_out in _adapter_dims(wq_shape, wk_shape, wv_shape, wo_shape,
                                           (aq_shape, ak_shape, av_shape, ao_shape)):
        flops += 2 * T * r * (n_in + n_out)  # t = drop(in) A^T, then t B^T
    return flops


@register_flop_formula(torch.ops.fused_ckpt.attn_lora_backward)
def _lora_backward_flops(dy_shape, x_shape, wq_shape, bq_shape, wk_shape, bk_shape, wv_shape, bv_shape, wo_shape,
                         q_shape, k_shape, v_shape, o_shape, lse_shape, tq_shape, tk_shape, tv_shape, to_shape,
                         aq_shape, ak_shape, av_shape, ao_shape, bq2_shape, bk2_shape, bv2_shape, bo2_shape, scalings,
                         pos_shape, mask_shape, n_heads, n_kv_heads, causal, scale, rope_theta, needs_grad, *args,
                         out_shape=None, **kwargs) -> int:
    adapters = _adapter_dims(wq_shape, wk_shape, wv_shape, wo_shape, (aq_shape, ak_shape, av_shape, ao_shape))
    needs = [bool(n) for n in needs_grad]
    present = {i for i, *_ in adapters}
    for i in range(4):
        if i not in present:
            needs[1 + 2 * i] = needs[2 + 2 * i] = False
    need_x, need_ao = needs[0], needs[7]
    need_attn = need_x or any(needs[1:7])
    qs, ks = _block_qk_shapes(x_shape, wo_shape, n_heads, n_kv_heads)
    T = math.prod(x_shape[:-1])
    d_out, hd = wo_shape
    window = kwargs.get("window", args[8] if len(args) > 8 else None)
    flops = 0
    if q_shape is None and (need_attn or (o_shape is None and need_ao)):  # q, k, v recomputed from the kept t
        flops += _proj_flops(x_shape, wq_shape, wk_shape, wv_shape)
        flops += sum(2 * T * r * n_out for i, r, _, n_out in adapters if i != _O)
    if o_shape is None and (need_attn or need_ao):
        flops += _attn_fwd_flops(qs, ks, causal, window)
    for i, r, n_in, n_out in adapters:
        need_a, need_b = needs[1 + 2 * i], needs[2 + 2 * i]
        need_in = need_attn if i == _O else need_x
        if i != _O and not need_attn:
            continue
        flops += 2 * T * n_out * r * int(need_b)  # dB = dZ^T t
        if need_a or need_in:
            flops += 2 * T * n_out * r  # g = dZ B
        flops += 2 * T * r * n_in * (int(need_a) + int(need_in))  # dA = g^T drop(in); g A
    if need_attn:
        flops += 2 * T * d_out * hd  # dO = dY Wo
        backend = args[0] if args else kwargs.get("backend")
        flops += _attn_bwd_flops(qs, ks, causal, True, True, _two_kernel_backward(backend), window)
        if need_x:
            flops += sum(2 * T * w[0] * x_shape[-1] for w in (wq_shape, wk_shape, wv_shape) if w is not None)
    return flops


def attn_lora_saved_bytes(tokens: int, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, mode: str,
                          ranks: tuple, elem_size: int, rank_elem_size: Optional[int] = None,
                          lse_size: int = 4) -> int:
    """Bytes the op keeps besides parameters (``mode`` "all"/"qkv"/"none"): the block op's
    (x, lse; o unless "all"; q, k, v for "none") plus each adapter's ``[tokens, r]`` product in
    the factors' dtype (``rank_elem_size``, default ``elem_size``)."""
    from ..accounting import attention_saved_bytes

    dial = {"all": "all", "qkv": "qkv", "none": False}[mode]
    rank_elem = elem_size if rank_elem_size is None else rank_elem_size
    return (attention_saved_bytes(tokens, d_model, n_heads, n_kv_heads, head_dim, dial, elem_size, lse_size)
            + tokens * sum(ranks) * rank_elem)
