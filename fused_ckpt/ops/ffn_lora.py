"""The FFN with LoRA adapters on its projections and frozen base weights (PEFT's vanilla LoRA).

Per projection ``p`` (fc1 -- gate, or the packed / ungated fc1 --, the separate up weight,
fc2), with LoRA factors ``A_p [r, in]``, ``B_p [out, r]`` and ``scaling_p``::

    z_p = x W_p^T + b_p + scaling_p * (drop_p(x) A_p^T) B_p^T        fc1 / up, input x
    y   = h W2^T  + b2  + scaling_2 * (drop_2(h) A_2^T) B_2^T        fc2, input h = act(z)

which is what PEFT's ``lora.Linear`` computes (``base(x) + lora_B(lora_A(dropout(x))) *
scaling``). A projection without an adapter passes None for its factors.

Recompute contract:

========  ==========================================  ======================================
save      kept for backward (besides parameters)      recomputed in backward
========  ==========================================  ======================================
0         x, t_p = drop_p(input_p) A_p^T ``[tokens,   z (base GEMMs + the rank-r products from
          r]`` per adapter, the dropout seed (ints)   the kept t), h, the dropout masks
1         x, the t_p, z                               h, the dropout masks
========  ==========================================  ======================================

The base weights are frozen: no gradient is computed or allocated for them (or their biases);
the op returns dx and, per adapter, dA and dB. Dropout (``lora_dropout`` p, one p for all
adapters of the call) draws an independent keep mask per projection from a Philox (seed,
offset) drawn from torch's default generator -- the same bits as
:func:`fused_ckpt.ops.dropout.dropout_keep` at offsets ``rng_offset + 0/1/2`` -- and the
backward regenerates exactly those masks; no mask is kept. The masks are therefore not the
ones ``torch.nn.Dropout`` would draw (same distribution, different bits).

Backend (``backend``, resolved: "aten" or "triton"), chunked over tokens either way (as the FFN:
``chunk_tokens`` bounds the ``[tokens, d_ff]`` temporaries):

* "aten": torch GEMMs and the csrc elementwise ops.
* "triton": the fused FFN kernels with their HAS_LORA variants; the LoRA dropout of an input
  chunk is the ``lora_dropout`` kernel (the same Philox bits, no mask tensor). Forward: t_fc1 /
  t_up = ``drop(x) A^T`` (a torch GEMM), then ``_ffn_up_kernel`` forms z with each adapter's
  ``scaling t B^T`` in its fp32 accumulators (a loop over r in steps of 16 before the K loop;
  a packed gated fc1's adapter feeds both halves) and applies the activation; t_fc2 =
  ``drop(h) A_2^T`` (a torch GEMM); the fc2 GEMM (``_gemm_kernel``) adds ``scaling_2 t_2 B_2^T`` the
  same way. Backward: ``dY B_2`` (torch, ``[tokens, r]``), then ``_ffn_bwd_hidden_kernel``
  forms dH = dY W2 + drop_2'(scaling_2 (dY B_2) A_2) (the mask regenerated in the kernel from
  the Philox seed) and, recomputing, z with the adapters' terms from the kept t, and writes dZ
  (and h for dA_2); the dA / dB / dX terms below are torch GEMMs on dZ. Every low-rank term is
  summed with its base GEMM in fp32 and rounded once; its dot runs in the factors' dtype, fp32
  factors over a 16-bit model as "tf32x3" on a GPU (about fp32 accuracy on tensor cores; see
  ``kernels.matmul.lora_flags``).

Backward per chunk (both backends; "triton" does the first and third lines in one kernel)::

    z, h recomputed; dH = dY W2 + drop_2'(scaling_2 (dY B_2) A_2)
    dB_2 += scaling_2 dY^T t_2      dA_2 += scaling_2 (dY B_2)^T drop_2(h)
    dZ = dH act'(z)
    dB_p += scaling_p dZ_p^T t_p    dA_p += scaling_p (dZ_p B_p)^T drop_p(x)
    dX = dZ_g W_g + dZ_u W_u + sum_p drop_p'(scaling_p (dZ_p B_p) A_p)

LoRA gradients are accumulated in fp32 (fp64 for fp64) over chunks and rounded once.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ..activations import get_activation
from ._autograd import guard_double_backward
from ._ffn_backends import TritonFFN, _ext_takes, _torch_act_backward
from .ffn import acc_dtype, default_chunk_tokens

# fc1 (gate / packed / ungated), up (separate up weight), fc2: the rng offset of each projection's mask
_FC1, _UP, _FC2 = 0, 1, 2


def _keep(seed: int, offset: int, p: float, start: int, end: int, n: int, device) -> Tensor:
    """Keep mask [end - start, n] of rows [start, end) of a [tokens, n] input."""
    from .dropout import dropout_keep

    return dropout_keep(seed, offset, p, start * n, end * n, device).view(end - start, n)


def _drop(t: Tensor, keep: Optional[Tensor], p: float) -> Tensor:
    return t if keep is None else (t * (1.0 / (1.0 - p))).masked_fill_(~keep, 0.0)


def _hidden(z: Tensor, act) -> Tensor:
    from .. import _ext

    return _ext.act_forward(z, act.name) if _ext_takes(z) else act.hidden(z)


def _act_backward(z: Tensor, dh: Tensor, act) -> Tensor:
    from .. import _ext

    if _ext_takes(z):
        return _ext.act_backward(z, dh, act.name, False)[0]
    return _torch_act_backward(z, dh, act, False)[0]


class _ChunkDrop:
    """``drop(t, i)``: projection i's LoRA dropout of rows [s, e) of its input (t [e - s, n]),
    the bits of :func:`_keep` at offset ``rng_offset + i``. aten: torch's Philox (each mask made
    once per chunk and reused); triton: the ``lora_dropout`` kernel (mask in registers)."""

    def __init__(self, triton: bool, seed: int, rng_offset: int, p: float, s: int, e: int):
        self.triton, self.seed, self.rng_offset, self.p, self.s, self.e = triton, seed, rng_offset, p, s, e
        self.keeps = {}

    def __call__(self, t: Tensor, i: int) -> Tensor:
        if self.p == 0:
            return t
        if self.triton:
            from ..kernels.ffn_fwd import lora_dropout

            return lora_dropout(t, self.p, self.seed, self.rng_offset + i, self.s)
        if i not in self.keeps:
            self.keeps[i] = _keep(self.seed, self.rng_offset + i, self.p, self.s, self.e, t.shape[1], t.device)
        return _drop(t, self.keeps[i], self.p)


def _chunk_z(xc, w1, b1, wu, bu, lora, ts, scaling, s: int, e: int) -> Tensor:
    """z of rows [s, e): the base GEMM(s) plus each adapter's ``scaling * t B^T`` from its kept t."""
    parts = [torch.nn.functional.linear(xc, w1, b1)]
    if wu is not None:
        parts.append(torch.nn.functional.linear(xc, wu, bu))
    for i, zp in enumerate(parts):
        if lora[i][0] is not None:
            _add_low_rank(zp, ts[i][s:e], lora[i][1], scaling[i])
    return parts[0] if wu is None else torch.cat(parts, -1)


def _acc(out: Tensor, a: Tensor, b: Tensor, alpha: float) -> None:
    """out += alpha * a @ b in place (``addmm`` with ``out=``, which FlopCounterMode counts;
    ``addmm_`` it does not)."""
    torch.addmm(out, a, b, alpha=alpha, out=out)


def _add_low_rank(out: Tensor, t: Tensor, b: Tensor, alpha: float) -> None:
    """out += alpha * t B^T. Factors in fp32 over a half-precision out (PEFT's default for a 16-bit
    model, ``autocast_adapter_dtype``): the sum is formed in fp32 and rounded once, as PEFT adds its
    fp32 LoRA term to the base output and rounds back."""
    if b.dtype == out.dtype:
        _acc(out, t, b.t(), alpha)
    else:
        out.copy_(torch.addmm(out.to(b.dtype), t, b.t(), alpha=alpha))


def _add(base: Tensor, term: Tensor) -> Tensor:
    """base + term in base's dtype (formed in term's dtype when it is wider)."""
    if term.dtype == base.dtype:
        return base.add_(term)
    return (base.to(term.dtype) + term).to(base.dtype)


def _check_backend(backend: str, x: Tensor) -> bool:
    """Whether ``backend`` is "triton" (the fused kernels); anything but "aten" / "triton" raises."""
    if backend not in ("aten", "triton"):
        raise ValueError(f"FFN LoRA op: backend must be 'aten' or 'triton' (resolved), got {backend!r}")
    if backend == "triton":
        from ..backend import check_backend_dtype

        check_backend_dtype("triton", x.dtype, "x")
    return backend == "triton"


def _kernel_sides(lora, ts, scaling, s: int, e: int, packed: bool, gated: bool, f: int):
    """The (gate side, up side) of rows [s, e) the fused kernels read: (t, B, scaling) or None."""
    from ..kernels.ffn_fwd import split_fc1_lora

    fc1, up = [(ts[i][s:e], lora[i][1], scaling[i]) if lora[i][0] is not None else None for i in (_FC1, _UP)]
    return split_fc1_lora(fc1, up, packed, gated, f)


# --------------------------------------------------------------------------- forward
def ffn_lora_forward_impl(
    x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
    w1_up: Optional[Tensor], b1_up: Optional[Tensor],
    a1: Optional[Tensor], l1: Optional[Tensor], au: Optional[Tensor], lu: Optional[Tensor],
    a2: Optional[Tensor], l2: Optional[Tensor], scaling: list[float], activation: str, save: int,
    dropout_p: float, seed: int, rng_offset: int, chunk_tokens: int, backend: str = "aten",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, t1, tu, t2, z): y has x's shape; t_p ``[tokens, r_p]`` the rank-r intermediates
    (empty for a projection without adapter); z ``[tokens, fc1_rows]`` when ``save >= 1``.
    ``backend``: "aten" or "triton" (see Backend in the module docstring)."""
    act = get_activation(activation)
    triton = _check_backend(backend, x)
    d = x.shape[-1]
    x2 = x.reshape(-1, d)
    M, dev = x2.shape[0], x.device
    lora = ((a1, l1), (au, lu), (a2, l2))
    ts = [x.new_empty((M, a.shape[0]), dtype=a.dtype) if a is not None else x.new_empty((0,)) for a, _ in lora]
    F1 = w1.shape[0] + (w1_up.shape[0] if w1_up is not None else 0)
    f = w2.shape[1]
    y = torch.empty(x.shape[:-1] + (w2.shape[0],), device=dev, dtype=x.dtype)
    y2 = y.view(M, w2.shape[0])
    z = torch.empty((M, F1), device=dev, dtype=x.dtype) if save >= 1 else None
    chunk = chunk_tokens or default_chunk_tokens(d, F1, f, x.element_size())
    for s in range(0, M, chunk):
        e = min(s + chunk, M)
        xc = x2[s:e]
        drop = _ChunkDrop(triton, seed, rng_offset, dropout_p, s, e)
        for i in (_FC1, _UP):
            if lora[i][0] is not None:
                ts[i][s:e] = torch.mm(drop(xc, i).to(lora[i][0].dtype), lora[i][0].t())
        if triton:  # the low-rank terms join the fused kernel's accumulators
            h, zc = TritonFFN.up(xc, w1, b1, w1_up, b1_up, act, z is not None,
                                 lora=_kernel_sides(lora, ts, scaling, s, e, w1_up is None, act.gated, f))
        else:
            zc = _chunk_z(xc, w1, b1, w1_up, b1_up, lora, ts, scaling, s, e)
            h = _hidden(zc, act)
        if z is not None:
            z[s:e] = zc
        if a2 is not None:
            ts[_FC2][s:e] = torch.mm(drop(h, _FC2).to(a2.dtype), a2.t())
        if triton:
            TritonFFN.down(h, w2, b2, y2[s:e], lora=(ts[_FC2][s:e], l2, scaling[_FC2]) if a2 is not None else None)
            continue
        y2[s:e] = torch.nn.functional.linear(h, w2, b2)
        if a2 is not None:
            _add_low_rank(y2[s:e], ts[_FC2][s:e], l2, scaling[_FC2])
    return y, ts[0], ts[1], ts[2], (z if z is not None else x.new_empty((0,)))


ffn_lora_forward = torch.library.custom_op("fused_ckpt::ffn_lora_forward", mutates_args=())(ffn_lora_forward_impl)


@ffn_lora_forward.register_fake
def _(x, w1, b1, w2, b2, w1_up, b1_up, a1, l1, au, lu, a2, l2, scaling, activation, save, dropout_p, seed,
      rng_offset, chunk_tokens, backend="aten"):
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    F1 = w1.shape[0] + (w1_up.shape[0] if w1_up is not None else 0)
    ts = [x.new_empty((tokens, a.shape[0]), dtype=a.dtype) if a is not None else x.new_empty((0,))
          for a in (a1, au, a2)]
    z = x.new_empty((tokens, F1)) if save >= 1 else x.new_empty((0,))
    return x.new_empty(x.shape[:-1] + (w2.shape[0],)), ts[0], ts[1], ts[2], z


# --------------------------------------------------------------------------- backward
def ffn_lora_backward_impl(
    dy: Tensor, x: Tensor, z: Optional[Tensor], w1: Tensor, b1: Optional[Tensor], w2: Tensor,
    w1_up: Optional[Tensor], b1_up: Optional[Tensor],
    a1: Optional[Tensor], l1: Optional[Tensor], au: Optional[Tensor], lu: Optional[Tensor],
    a2: Optional[Tensor], l2: Optional[Tensor], t1: Optional[Tensor], tu: Optional[Tensor],
    t2: Optional[Tensor], scaling: list[float], activation: str, need_x: bool, dropout_p: float, seed: int,
    rng_offset: int, chunk_tokens: int, backend: str = "aten",
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA1, dB1, dAu, dBu, dA2, dB2); absent adapters (and dx when not ``need_x``) come
    back as empty placeholders."""
    act = get_activation(activation)
    triton = _check_backend(backend, x)
    d = x.shape[-1]
    x2, dy2 = x.reshape(-1, d), dy.reshape(-1, dy.shape[-1])
    M, dev = x2.shape[0], x.device
    lora = ((a1, l1), (au, lu), (a2, l2))
    ts = (t1, tu, t2)
    f1, f = w1.shape[0], w2.shape[1]
    F1 = f1 + (w1_up.shape[0] if w1_up is not None else 0)
    z2 = z.reshape(-1, F1) if z is not None else None
    acc = acc_dtype(x.dtype)
    grads = [(torch.zeros(a.shape, device=dev, dtype=acc), torch.zeros(b.shape, device=dev, dtype=acc))
             if a is not None else None for a, b in lora]
    dx = torch.empty(x.shape, device=dev, dtype=x.dtype) if need_x else None
    dx2 = dx.view(M, d) if need_x else None
    chunk = chunk_tokens or default_chunk_tokens(d, F1, f, x.element_size())
    p = dropout_p
    for s in range(0, M, chunk):
        e = min(s + chunk, M)
        xc, dyc = x2[s:e], dy2[s:e]
        drop = _ChunkDrop(triton, seed, rng_offset, p, s, e)
        g2 = torch.mm(dyc.to(l2.dtype), l2) if a2 is not None else None  # [m, r2]
        if triton:  # one fused kernel: dH with the fc2 term, z recomputed with the low-rank terms, dZ
            zc = z2[s:e] if z2 is not None else None
            sides = _kernel_sides(lora, ts, scaling, s, e, w1_up is None, act.gated, f) if zc is None else None
            lora_dh = (g2, a2, scaling[_FC2], p, seed, rng_offset + _FC2, s) if a2 is not None else None
            dz, h = TritonFFN.hidden_grad(xc, zc, dyc, w1, b1, w1_up, b1_up, w2, act, a2 is not None,
                                          lora=sides, lora_dh=lora_dh)
        else:
            zc = z2[s:e] if z2 is not None else _chunk_z(xc, w1, b1, w1_up, b1_up, lora, ts, scaling, s, e)
            dh = torch.mm(dyc, w2)
            h = _hidden(zc, act) if a2 is not None else None
        if a2 is not None:
            sc = scaling[_FC2]
            _acc(grads[_FC2][1], dyc.t().to(acc), ts[_FC2][s:e].to(acc), alpha=sc)
            _acc(grads[_FC2][0], g2.t().to(acc), drop(h, _FC2).to(acc), alpha=sc)
            if not triton:
                dh = _add(dh, drop(torch.mm(g2, a2) * sc, _FC2))
        del h
        if not triton:
            dz = _act_backward(zc, dh, act)
        dzs = [dz] if w1_up is None else [dz[:, :f1], dz[:, f1:]]
        lora_dx = None
        for i, dzp in enumerate(dzs):
            a, b = lora[i]
            if a is None:
                continue
            sc = scaling[i]
            g = torch.mm(dzp.to(b.dtype), b)  # [m, r]
            _acc(grads[i][1], dzp.t().to(acc), ts[i][s:e].to(acc), alpha=sc)
            _acc(grads[i][0], g.t().to(acc), drop(xc, i).to(acc), alpha=sc)
            if need_x:
                term = drop(torch.mm(g, a) * sc, i)  # in the factors' dtype
                lora_dx = term if lora_dx is None else lora_dx + term
        if need_x:
            out = torch.mm(dzs[0], w1)
            if w1_up is not None:
                out += torch.mm(dzs[1], w1_up)
            if lora_dx is not None:
                out = _add(out, lora_dx)
            dx2[s:e] = out
    outs = [dx if need_x else x.new_empty((0,))]
    for (a, b), g in zip(lora, grads):
        outs += [g[0].to(a.dtype), g[1].to(b.dtype)] if g is not None else [x.new_empty((0,)), x.new_empty((0,))]
    return tuple(outs)


ffn_lora_backward = torch.library.custom_op("fused_ckpt::ffn_lora_backward", mutates_args=())(ffn_lora_backward_impl)


@ffn_lora_backward.register_fake
def _(dy, x, z, w1, b1, w2, w1_up, b1_up, a1, l1, au, lu, a2, l2, t1, tu, t2, scaling, activation, need_x,
      dropout_p, seed, rng_offset, chunk_tokens, backend="aten"):
    outs = [x.new_empty(x.shape) if need_x else x.new_empty((0,))]
    for a, b in ((a1, l1), (au, lu), (a2, l2)):
        outs += [a.new_empty(a.shape), b.new_empty(b.shape)] if a is not None else [x.new_empty((0,))] * 2
    return tuple(outs)


# --------------------------------------------------------------------------- autograd
_N_IN = 21  # ffn_lora_forward's inputs


def _setup_context(ctx, inputs, output):
    (x, w1, b1, w2, b2, w1_up, b1_up, a1, l1, au, lu, a2, l2, scaling, activation, save, dropout_p, seed,
     rng_offset, chunk_tokens, backend) = tuple(inputs) + ("aten",) * (_N_IN - len(inputs))
    _, t1, tu, t2, z = output
    ctx.save_for_backward(x, w1, b1, w2, w1_up, b1_up, a1, l1, au, lu, a2, l2,
                          t1 if a1 is not None else None, tu if au is not None else None,
                          t2 if a2 is not None else None, z if save >= 1 else None)
    ctx.opts = (list(scaling), activation, dropout_p, seed, rng_offset, chunk_tokens, backend)


def _backward(ctx, grad_y, *_unused):
    x, w1, b1, w2, w1_up, b1_up, a1, l1, au, lu, a2, l2, t1, tu, t2, z = ctx.saved_tensors
    scaling, activation, p, seed, off, chunk, backend = ctx.opts
    need = ctx.needs_input_grad
    if any(need[i] for i in (1, 2, 3, 4, 5, 6)):
        raise RuntimeError("fused_ckpt FFN LoRA op: the base weights must be frozen (requires_grad=False), as "
                           "PEFT sets them; a trainable base runs the unfused path")
    with torch.no_grad():
        grads = ffn_lora_backward(grad_y, x, z, w1, b1, w2, w1_up, b1_up, a1, l1, au, lu, a2, l2, t1, tu, t2,
                                  scaling, activation, bool(need[0]), p, seed, off, chunk, backend)
    grads = guard_double_backward(grads, (grad_y, x, a1, l1, au, lu, a2, l2), "FFN LoRA")
    dx, da1, dl1, dau, dlu, da2, dl2 = grads
    pick = lambda g, i: g if need[i] else None  # noqa: E731
    return (pick(dx, 0), None, None, None, None, None, None, pick(da1, 7), pick(dl1, 8), pick(dau, 9),
            pick(dlu, 10), pick(da2, 11), pick(dl2, 12)) + (None,) * (len(need) - 13)


ffn_lora_forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- FLOP formulas
# FlopCounterMode cannot see inside a custom op: the GEMM FLOPs the implementation performs (a test
# checks them against the counted GEMMs of the implementation).
def _adapters(w1_shape, w1_up_shape, w2_shape, a1_shape, au_shape, a2_shape):
    """[(rank, in, out)] of the fc1 / up adapters and (rank, in, out) or None of the fc2 one."""
    ins = [(a1_shape, w1_shape), (au_shape, w1_up_shape)]
    x_side = [(a[0], w[1], w[0]) for a, w in ins if a is not None]
    return x_side, ((a2_shape[0], w2_shape[1], w2_shape[0]) if a2_shape is not None else None)


@register_flop_formula(torch.ops.fused_ckpt.ffn_lora_forward)
def _lora_forward_flops(x_shape, w1_shape, b1_shape, w2_shape, b2_shape, w1_up_shape, b1_up_shape, a1_shape,
                        l1_shape, au_shape, lu_shape, a2_shape, l2_shape, *args, out_shape=None, **kwargs) -> int:
    M = math.prod(x_shape[:-1])
    F1 = w1_shape[0] + (w1_up_shape[0] if w1_up_shape is not None else 0)
    flops = 2 * M * w1_shape[1] * F1 + 2 * M * w2_shape[1] * w2_shape[0]  # base GEMMs
    x_side, out_side = _adapters(w1_shape, w1_up_shape, w2_shape, a1_shape, au_shape, a2_shape)
    for r, n_in, n_out in x_side + ([out_side] if out_side else []):
        flops += 2 * M * r * (n_in + n_out)  # t = drop(in) A^T, then t B^T
    return flops


@register_flop_formula(torch.ops.fused_ckpt.ffn_lora_backward)
def _lora_backward_flops(dy_shape, x_shape, z_shape, w1_shape, b1_shape, w2_shape, w1_up_shape, b1_up_shape,
                         a1_shape, l1_shape, au_shape, lu_shape, a2_shape, l2_shape, t1_shape, tu_shape, t2_shape,
                         scaling, activation, need_x, *args, out_shape=None, **kwargs) -> int:
    M = math.prod(x_shape[:-1])
    d, f, d_out = w1_shape[1], w2_shape[1], w2_shape[0]
    F1 = w1_shape[0] + (w1_up_shape[0] if w1_up_shape is not None else 0)
    x_side, out_side = _adapters(w1_shape, w1_up_shape, w2_shape, a1_shape, au_shape, a2_shape)
    flops = 2 * M * d_out * f  # dH = dY W2
    if z_shape is None:  # z recomputed: base GEMMs and t B^T from the kept t
        flops += 2 * M * d * F1 + sum(2 * M * r * n_out for r, _, n_out in x_side)
    if out_side:
        r, n_in, n_out = out_side
        flops += 2 * 2 * M * n_out * r + 2 * 2 * M * r * n_in  # dB, dY B; dA, (dY B) A
    for r, n_in, n_out in x_side:
        flops += 2 * 2 * M * n_out * r + 2 * M * r * n_in  # dZ B, dB; dA
        if need_x:
            flops += 2 * M * r * n_in  # (dZ B) A into dX
    if need_x:
        flops += 2 * M * F1 * d  # dX = dZ W1 (separate: dG Wg + dU Wu)
    return flops


def ffn_lora_saved_bytes(tokens: int, d_model: int, ranks: tuple, save: int, fc1_rows: int, elem_size: int,
                         rank_elem_size: Optional[int] = None) -> int:
    """Bytes the op keeps besides parameters: x, each adapter's ``[tokens, r]`` (in the factors'
    dtype: ``rank_elem_size``, default ``elem_size``), z when save >= 1."""
    rank_elem = elem_size if rank_elem_size is None else rank_elem_size
    return tokens * ((d_model + (fc1_rows if save >= 1 else 0)) * elem_size + sum(ranks) * rank_elem)
