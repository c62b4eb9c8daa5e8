"""The LM head fused with cross-entropy: ``torch.library`` custom ops, autograd, FLOP formulas.

    z = x W^T + b          s = c tanh(z / c)  (softcap c; s = z without it)
    lse = log sum_j exp(s_j)
    loss_i = lse - (1 - eps) s_t - (eps / V) sum_j s_j + z_loss lse^2     (0 for ignored tokens)

which is ``F.cross_entropy(s, t, ignore_index, label_smoothing=eps, reduction="none")`` plus
PaLM's z-loss. Reductions: "none" (per token), "sum" (times ``scale``, i.e. 1 / num_items), "mean"
(divided by the number of non-ignored tokens; NaN when there are none, like PyTorch).

Recompute contract (``save``, the dial the planner sets):

=========  ========================================  =========================================
save       kept for backward (besides W, b)          backward work
=========  ========================================  =========================================
0 (True)   x, lse (fp32, one per token), targets     logits recomputed tile by tile:
                                                     dz = coef (softmax - onehot ...) ds/dz,
                                                     dX = dz W, dW = dz^T x (3 GEMMs)
1 (False)  dX, dW, db (computed in the forward,      scale them by the upstream gradient
           for a unit upstream gradient)             (no GEMM)
=========  ========================================  =========================================

The forward computes lse with an online softmax over vocabulary tiles (Triton: inside the GEMM's
epilogue; aten: per [tokens, vocab] chunk), the target logit and, for label smoothing, the sum
of logits on the way, so no ``[tokens, V]`` tensor exists. Gradients are formed per chunk of
``chunk_tokens`` x ``chunk_vocab`` logits: the dz chunk (x's dtype) and its GEMMs into dX
(fp32 accumulator when the vocabulary takes several chunks) and dW (fp32 accumulator when the
tokens take several chunks). save=1 (Liger's design) instead computes, per chunk of tokens, one
[chunk, V] fp32 logits chunk with a GEMM, derives the rows' log-sum-exp and gradient from it and
runs the dX and dW GEMMs in the forward: 3 GEMMs in all against save=0's 4, for holding dX and
dW (and db) from forward to backward.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

from ._autograd import guard_double_backward
from ._ffn_backends import AtenFFN, TritonFFN, _mm_fp32

# Chunk temporaries (the dz chunk; aten's fp32 logits chunk) stay under this many bytes.
CHUNK_TEMP_BYTES = 256 * 2**20
CHUNK_ROUND = 128  # chunks are whole 128-wide tiles of the kernels and GEMMs
REDUCTIONS = {"none": 0, "sum": 1, "mean": 2}


def chunk_sizes(tokens: int, vocab: int, chunk_tokens: int = 0, chunk_vocab: int = 0) -> tuple[int, int]:
    """(tokens, classes) per chunk; 0 picks automatically.

    Tokens: all of them up to max(V, 8192), so that the usual LM batch is one token chunk and dW
    needs no fp32 accumulator (beyond that, an fp32 dW accumulator of V*d*4 bytes is no larger
    than the fp32 dX accumulator of the token chunk would be). Classes: as many as keep a
    [tokens, classes] fp32 chunk under CHUNK_TEMP_BYTES."""
    cap = max(vocab, 8192) // CHUNK_ROUND * CHUNK_ROUND
    c = chunk_tokens or (tokens if tokens <= cap else cap)
    c = max(1, min(c, tokens))
    vc = chunk_vocab or max(CHUNK_ROUND, CHUNK_TEMP_BYTES // (4 * c) // CHUNK_ROUND * CHUNK_ROUND)
    return c, max(1, min(vc, vocab))


def linear_ce_saved_bytes(tokens: int, d_model: int, vocab: int, recompute: bool, elem_size: int,
                          target_elem_size: int = 8, needs_grad=(True, True, False)) -> int:
    """Bytes kept for backward besides the parameters (the contract above; tests check it against
    saved_tensors_hooks). recompute=False keeps the gradients that ``needs_grad`` (x, W, b) asks
    for, in x's / the weight's dtype."""
    if recompute:
        return tokens * (d_model * elem_size + 4 + target_elem_size)
    need_x, need_w, need_b = needs_grad
    return (need_x * tokens * d_model + need_w * vocab * d_model + need_b * vocab) * elem_size


def linear_ce_recompute_flops(tokens: int, d_model: int, vocab: int, recompute: bool) -> int:
    """GEMM FLOPs spent recomputing the logits in backward: one logits GEMM with recompute=True,
    none with recompute=False."""
    return 2 * tokens * d_model * vocab if recompute else 0


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of the statistics, losses and accumulators: fp32, or fp64 for float64 inputs
    (aten backend only; it computes float64 in float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty(ref: Tensor) -> Tensor:
    """Placeholder for an output that was not asked for (custom ops return tensors only)."""
    return ref.new_empty((0,))


# --------------------------------------------------------------------------- backends
def _softcapped(z: Tensor, softcap: float) -> tuple[Tensor, Optional[Tensor]]:
    if not softcap:
        return z, None
    th = torch.tanh(z / softcap)
    return softcap * th, 1.0 - th * th


class _TritonLCE:
    mm = staticmethod(TritonFFN.mm)

    @staticmethod
    def stats(x, w, b, t, softcap, need_sum, chunk_vocab):
        from ..kernels.linear_ce import lce_stats
        return lce_stats(x, w, b, t, softcap, need_sum)

    @staticmethod
    def dlogits(x, w, b, t, lse, coef, out, **kw):
        from ..kernels.linear_ce import lce_dlogits
        return lce_dlogits(x, w, b, t, lse, coef, out, **kw)

    @staticmethod
    def rows(x, w, b, t, coef, out, **kw):
        from ..kernels.linear_ce import lce_rows
        return lce_rows(x, w, b, t, coef, out, **kw)


class _AtenLCE:
    mm = staticmethod(AtenFFN.mm)

    @staticmethod
    def _logits(x, w, b):
        if x.dtype == torch.float64:
            return F.linear(x, w, b)
        z = _mm_fp32(x, w.t())
        return z + b.float() if b is not None else z

    @staticmethod
    def stats(x, w, b, t, softcap, need_sum, chunk_vocab):
        """Online log-sum-exp over [tokens, chunk_vocab] fp32 logits chunks."""
        M, V = x.shape[0], w.shape[0]
        acc = acc_dtype(x.dtype)
        lse = torch.full((M,), float("-inf"), device=x.device, dtype=acc)
        tgt = torch.zeros((M,), device=x.device, dtype=acc)
        tot = torch.zeros((M,), device=x.device, dtype=acc) if need_sum else None
        for v0 in range(0, V, chunk_vocab):
            v1 = min(v0 + chunk_vocab, V)
            s, _ = _softcapped(_AtenLCE._logits(x, w[v0:v1], b[v0:v1] if b is not None else None), softcap)
            lse = torch.logaddexp(lse, torch.logsumexp(s, 1))
            idx = t - v0
            inside = (idx >= 0) & (idx < v1 - v0)
            picked = s.gather(1, idx.clamp(0, v1 - v0 - 1)[:, None])[:, 0]
            tgt += torch.where(inside, picked, 0.0)
            if need_sum:
                tot += s.sum(1)
            del s
        return lse, tgt, tot

    @staticmethod
    def rows(x, w, b, t, coef, out, *, label_smoothing, z_loss, softcap):
        """One fp32 logits GEMM against the whole vocabulary, then statistics and gradient."""
        s, ds = _softcapped(_AtenLCE._logits(x, w, b), softcap)
        lse = torch.logsumexp(s, 1)
        V = w.shape[0]
        tgt = s.gather(1, t.clamp(0, V - 1)[:, None])[:, 0]
        tot = s.sum(1) if label_smoothing else None
        _AtenLCE._grad_from_logits(s, ds, t, lse, coef, out, 0, label_smoothing, V, z_loss)
        return lse, tgt, tot

    @staticmethod
    def dlogits(x, w, b, t, lse, coef, out, *, t_offset, label_smoothing, vocab, z_loss, softcap):
        s, ds = _softcapped(_AtenLCE._logits(x, w, b), softcap)
        return _AtenLCE._grad_from_logits(s, ds, t, lse, coef, out, t_offset, label_smoothing, vocab, z_loss)

    @staticmethod
    def _grad_from_logits(s, ds, t, lse, coef, out, t_offset, label_smoothing, vocab, z_loss):
        g = torch.exp(s - lse[:, None])
        if z_loss:
            g *= (1.0 + 2.0 * z_loss * lse)[:, None]
        if label_smoothing:
            g -= label_smoothing / vocab
        n = s.shape[1]
        idx = t - t_offset
        inside = (idx >= 0) & (idx < n)
        g.scatter_add_(1, idx.clamp(0, max(n - 1, 0))[:, None],
                       inside.to(g.dtype)[:, None] * (label_smoothing - 1.0))
        if ds is not None:
            g *= ds
        g *= coef[:, None]
        out.copy_(g)
        return out


_BACKENDS = {"triton": _TritonLCE, "aten": _AtenLCE}


def _check_targets(t: Tensor, vocab: int, ignore_index: int) -> None:
    bad = (t != ignore_index) & ((t < 0) | (t >= vocab))
    if t.numel() and bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"target {int(t[i])} (flattened position {i}) is out of range for a vocabulary of "
                         f"{vocab} classes and is not ignore_index={ignore_index}")


def _grads(x2: Tensor, w: Tensor, b: Optional[Tensor], t: Tensor, lse: Tensor, coef: Tensor,
           needs: list, eps: float, softcap: float, z_loss: float, chunk_tokens: int, chunk_vocab: int,
           be) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dX [T, d], dW [V, d], db [V]) for per-token upstream weights ``coef`` (0 on ignored
    tokens), chunk by chunk; None where ``needs`` (x, W, b) says no."""
    need_x, need_w, need_b = needs
    T, d = x2.shape
    V = w.shape[0]
    dev = x2.device
    C, Vc = chunk_sizes(T, V, chunk_tokens, chunk_vocab)
    n_tc, n_vc = -(-T // C), -(-V // Vc)
    dx = torch.empty((T, d), device=dev, dtype=x2.dtype) if need_x else None
    acc = acc_dtype(x2.dtype)
    dx_acc = torch.empty((C, d), device=dev, dtype=acc) if need_x and n_vc > 1 else None
    new_dw = torch.zeros if T == 0 else torch.empty  # the first token chunk overwrites dW
    dw = new_dw((V, d), device=dev, dtype=acc if n_tc > 1 else w.dtype) if need_w else None
    db = torch.zeros((V,), device=dev, dtype=acc) if need_b else None
    if T == 0 or not (need_x or need_w or need_b):
        return dx, dw, db
    dz_buf = torch.empty((C, Vc), device=dev, dtype=x2.dtype)
    for ti, t0 in enumerate(range(0, T, C)):
        t1 = min(t0 + C, T)
        xc, tc, lc, cc = x2[t0:t1], t[t0:t1], lse[t0:t1], coef[t0:t1]
        for vi, v0 in enumerate(range(0, V, Vc)):
            v1 = min(v0 + Vc, V)
            wv = w[v0:v1]
            dz = dz_buf[: t1 - t0, : v1 - v0]
            be.dlogits(xc, wv, b[v0:v1] if b is not None else None, tc, lc, cc, dz, t_offset=v0,
                       label_smoothing=eps, vocab=V, z_loss=z_loss, softcap=softcap)
            if need_x:
                if n_vc == 1:
                    be.mm(dz, wv, dx[t0:t1], accumulate=False)
                else:
                    be.mm(dz, wv, dx_acc[: t1 - t0], accumulate=vi > 0)
            if need_w:
                be.mm(dz.t(), xc, dw[v0:v1], accumulate=ti > 0)
            if need_b:
                db[v0:v1] += dz.sum(0, dtype=acc)
        if need_x and n_vc > 1:
            dx[t0:t1].copy_(dx_acc[: t1 - t0])
    return dx, (dw.to(w.dtype) if need_w else None), db


def _grads_in_forward(x2: Tensor, w: Tensor, b: Optional[Tensor], t: Tensor, coef: Tensor, needs: list,
                      eps: float, softcap: float, z_loss: float, chunk_tokens: int, be):
    """recompute=False: per token chunk, one [chunk, V] fp32 logits GEMM, the rows' statistics and
    gradient from it, then dX and dW: 3 GEMMs. Returns (lse, target logit, sum of logits or None,
    dX, dW, db), the gradients for upstream weights ``coef``; None where ``needs`` says no."""
    need_x, need_w, need_b = needs
    T, d = x2.shape
    V = w.shape[0]
    dev = x2.device
    C = chunk_tokens or grads_in_forward_chunk(V, x2.element_size())
    C = max(1, min(C, T))
    n_tc = -(-T // C)
    acc = acc_dtype(x2.dtype)
    lse = torch.empty((T,), device=dev, dtype=acc)
    tgt = torch.empty_like(lse)
    tot = torch.empty_like(lse) if eps else None
    dx = torch.empty((T, d), device=dev, dtype=x2.dtype) if need_x else None
    new_dw = torch.zeros if T == 0 else torch.empty  # the first token chunk overwrites dW
    dw = new_dw((V, d), device=dev, dtype=acc if n_tc > 1 else w.dtype) if need_w else None
    db = torch.zeros((V,), device=dev, dtype=acc) if need_b else None
    if T == 0:
        return lse, tgt, tot, dx, dw, db
    dz_buf = torch.empty((C, V), device=dev, dtype=x2.dtype)
    for ti, t0 in enumerate(range(0, T, C)):
        t1 = min(t0 + C, T)
        xc, dz = x2[t0:t1], dz_buf[: t1 - t0]
        lc, tg, sm = be.rows(xc, w, b, t[t0:t1], coef[t0:t1], dz, label_smoothing=eps, z_loss=z_loss,
                             softcap=softcap)
        lse[t0:t1], tgt[t0:t1] = lc, tg
        if eps:
            tot[t0:t1] = sm
        if need_x:
            be.mm(dz, w, dx[t0:t1], accumulate=False)
        if need_w:
            be.mm(dz.t(), xc, dw, accumulate=ti > 0)
        if need_b:
            db += dz.sum(0, dtype=acc)
    return lse, tgt, tot, dx, (dw.to(w.dtype) if need_w else None), db


def grads_in_forward_chunk(vocab: int, elem_size: int) -> int:
    """Tokens per chunk of the recompute=False forward: its [chunk, V] fp32 logits plus the
    gradient chunk in x's dtype stay under CHUNK_TEMP_BYTES (whole 128-row tiles when possible)."""
    c = CHUNK_TEMP_BYTES // max(vocab * (4 + elem_size), 1)
    return max(1, c // CHUNK_ROUND * CHUNK_ROUND if c >= CHUNK_ROUND else c)


def _coef(valid: Tensor, grad_losses: Optional[Tensor], grad_loss: Optional[Tensor], reduction: int,
          scale: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """Per-token upstream weight of dLoss_i: the per-token gradient plus the reduced loss's
    gradient times d(reduced)/d(loss_i); 0 on ignored tokens."""
    coef = torch.zeros(valid.shape, device=valid.device, dtype=dtype)
    if grad_losses is not None and grad_losses.numel() == valid.numel():
        coef += grad_losses.reshape(-1).to(dtype)
    if reduction != 0 and grad_loss is not None and grad_loss.numel() == 1:
        unit = scale if reduction == 1 else 1.0 / valid.sum().clamp(min=1).to(dtype)
        coef += grad_loss.reshape(()).to(dtype) * unit
    return torch.where(valid, coef, 0.0)


# --------------------------------------------------------------------------- forward
def linear_ce_forward_impl(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
    label_smoothing: float, softcap: float, z_loss: float, reduction: int, scale: float, save: int,
    needs_grad: list[bool], chunk_tokens: int, chunk_vocab: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (loss, losses, z_term, lse, dx, dw, db), all fp32 but the gradients:
    loss: the reduced loss (0-d; an empty placeholder for reduction "none"); losses: per-token
    losses, target's shape; z_term: the z-loss part, reduced like the loss (per token for "none");
    lse: [T] when save == 0; dx, dw, db: gradients for a unit upstream gradient of the reduced
    loss when save == 1 and ``needs_grad`` (x, W, b) asks for them; placeholders otherwise."""
    be = _BACKENDS[backend]
    d = x.shape[-1]
    V = weight.shape[0]
    x2 = x.reshape(-1, d)
    T = x2.shape[0]
    t = target.reshape(-1).to(torch.int64)
    _check_targets(t, V, ignore_index)
    eps = label_smoothing
    valid = t != ignore_index
    dx = dw = db = None
    if save == 1 and any(needs_grad):
        coef = _coef(valid, None, torch.ones((), device=x.device), reduction, scale, acc_dtype(x.dtype))
        lse, tgt, tot, dx, dw, db = _grads_in_forward(x2, weight, bias, t, coef, needs_grad, eps, softcap,
                                                      z_loss, chunk_tokens, be)
        dx = dx.view(x.shape) if dx is not None else None
        db = db.to(bias.dtype) if db is not None else None
    else:
        C, Vc = chunk_sizes(T, V, chunk_tokens, chunk_vocab)
        lse = torch.empty((T,), device=x.device, dtype=acc_dtype(x.dtype))
        tgt = torch.empty_like(lse)
        tot = torch.empty_like(lse) if eps else None
        for t0 in range(0, T, C):
            t1 = min(t0 + C, T)
            lc, tg, sm = be.stats(x2[t0:t1], weight, bias, t[t0:t1], softcap, bool(eps), Vc)
            lse[t0:t1], tgt[t0:t1] = lc, tg
            if eps:
                tot[t0:t1] = sm
    z_term = torch.where(valid, z_loss * lse * lse, 0.0)
    per = lse - (1.0 - eps) * tgt + z_term
    if eps:
        per = per - (eps / V) * tot
    per = torch.where(valid, per, 0.0)
    if reduction == 0:
        loss, z_out = _empty(lse), z_term.view(target.shape)
    elif reduction == 1:
        loss, z_out = per.sum() * scale, z_term.sum() * scale
    else:
        count = valid.sum()
        loss, z_out = per.sum() / count, z_term.sum() / count
    return (loss, per.view(target.shape), z_out, lse if save == 0 else _empty(lse),
            dx if dx is not None else _empty(x), dw if dw is not None else _empty(weight),
            db if db is not None else _empty(weight))


linear_ce_forward = torch.library.custom_op("fused_ckpt::linear_ce_forward", mutates_args=())(
    linear_ce_forward_impl)


@linear_ce_forward.register_fake
def _(x, weight, bias, target, ignore_index, label_smoothing, softcap, z_loss, reduction, scale, save,
      needs_grad, chunk_tokens, chunk_vocab, backend):
    f32 = dict(dtype=acc_dtype(x.dtype))
    tokens = target.numel()
    grads = save == 1 and any(needs_grad)
    need_x, need_w, need_b = needs_grad
    return (
        x.new_empty((0,) if reduction == 0 else (), **f32),
        x.new_empty(target.shape, **f32),
        x.new_empty(target.shape if reduction == 0 else (), **f32),
        x.new_empty((tokens,) if save == 0 else (0,), **f32),
        x.new_empty(x.shape) if grads and need_x else x.new_empty((0,)),
        weight.new_empty(weight.shape) if grads and need_w else weight.new_empty((0,)),
        bias.new_empty(bias.shape) if grads and need_b else weight.new_empty((0,)),
    )


# --------------------------------------------------------------------------- backward
def linear_ce_backward_impl(
    grad_loss: Optional[Tensor], grad_losses: Optional[Tensor], x: Tensor, weight: Tensor,
    bias: Optional[Tensor], target: Tensor, lse: Tensor, ignore_index: int, label_smoothing: float,
    softcap: float, z_loss: float, reduction: int, scale: float, needs_grad: list[bool],
    chunk_tokens: int, chunk_vocab: int, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw, db) with the logits recomputed from x; unflagged ones are empty placeholders."""
    d = x.shape[-1]
    t = target.reshape(-1).to(torch.int64)
    coef = _coef(t != ignore_index, grad_losses, grad_loss, reduction, scale, acc_dtype(x.dtype))
    dx, dw, db = _grads(x.reshape(-1, d), weight, bias, t, lse, coef, needs_grad, label_smoothing,
                        softcap, z_loss, chunk_tokens, chunk_vocab, _BACKENDS[backend])
    return (dx.view(x.shape) if dx is not None else _empty(x),
            dw if dw is not None else _empty(weight),
            db.to(bias.dtype) if db is not None else _empty(weight))


linear_ce_backward = torch.library.custom_op("fused_ckpt::linear_ce_backward", mutates_args=())(
    linear_ce_backward_impl)


@linear_ce_backward.register_fake
def _(grad_loss, grad_losses, x, weight, bias, target, lse, ignore_index, label_smoothing, softcap,
      z_loss, reduction, scale, needs_grad, chunk_tokens, chunk_vocab, backend):
    need_x, need_w, need_b = needs_grad
    return (x.new_empty(x.shape) if need_x else x.new_empty((0,)),
            weight.new_empty(weight.shape) if need_w else weight.new_empty((0,)),
            bias.new_empty(bias.shape) if need_b else weight.new_empty((0,)))


# --------------------------------------------------------------------------- autograd
_N_ARGS = 15


def _setup_context(ctx, inputs, output):
    (x, weight, bias, target, ignore_index, eps, softcap, z_loss, reduction, scale, save, needs,
     chunk_tokens, chunk_vocab, backend) = inputs
    _, _, _, lse, dx, dw, db = output
    ctx.save = save
    if save == 0:
        ctx.save_for_backward(x, weight, bias, target, lse)
    else:
        need_x, need_w, need_b = needs
        ctx.save_for_backward(dx if need_x else None, dw if need_w else None, db if need_b else None)
    ctx.args = (ignore_index, eps, softcap, z_loss, reduction, scale)
    ctx.chunks = (chunk_tokens, chunk_vocab, backend)


def _backward(ctx, grad_loss, grad_losses, grad_z, grad_lse, grad_dx, grad_dw, grad_db):
    needs = list(ctx.needs_input_grad[:3])
    if ctx.save == 0:
        x, weight, bias, target, lse = ctx.saved_tensors
        with torch.no_grad():
            grads = linear_ce_backward(grad_loss, grad_losses, x, weight, bias, target, lse, *ctx.args,
                                       needs, *ctx.chunks)
        grads = guard_double_backward(grads, (grad_loss, x, weight, bias), "linear cross-entropy")
    else:  # gradients for a unit upstream gradient were formed in the forward
        g = grad_loss.reshape(())
        grads = tuple(s * g.to(s.dtype) if s is not None else None for s in ctx.saved_tensors)
        grads = guard_double_backward(grads, (grad_loss,), "linear cross-entropy")
    grads = tuple(gr if n else None for gr, n in zip(grads, needs))
    return grads + (None,) * (_N_ARGS - 3)


linear_ce_forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- FLOP formulas
@register_flop_formula(torch.ops.fused_ckpt.linear_ce_forward)
def _forward_flops(x_shape, w_shape, b_shape, t_shape, ignore_index, eps, softcap, z_loss, reduction,
                   scale, save, needs_grad, *args, out_shape=None, **kwargs) -> int:
    unit = 2 * math.prod(x_shape[:-1]) * w_shape[1] * w_shape[0]
    flops = unit  # logits for the log-sum-exp
    if save == 1 and any(needs_grad):
        flops += unit * (needs_grad[0] + needs_grad[1])  # dX, dW from the stored logits chunk
    return flops


@register_flop_formula(torch.ops.fused_ckpt.linear_ce_backward)
def _backward_flops(gl_shape, gls_shape, x_shape, w_shape, b_shape, t_shape, lse_shape, ignore_index,
                    eps, softcap, z_loss, reduction, scale, needs_grad, *args, out_shape=None,
                    **kwargs) -> int:
    if not any(needs_grad):
        return 0
    unit = 2 * math.prod(x_shape[:-1]) * w_shape[1] * w_shape[0]
    return unit * (1 + needs_grad[0] + needs_grad[1])  # logits recomputed, dX, dW


# --------------------------------------------------------------------------- functional
class LinearCrossEntropyOutput(NamedTuple):
    """``return_details=True``: the loss (differentiable), the per-token losses and the z-loss
    term reduced like the loss (both detached, fp32; for logging)."""
    loss: Tensor
    per_token_loss: Tensor
    z_loss: Tensor


_AUTOCAST_DEVICES = ("cuda", "cpu", "xpu")


def check_linear_ce_inputs(x, weight, target, bias, ignore_index, label_smoothing, reduction, softcap,
                           z_loss, num_items, recompute) -> None:
    """Raise a ValueError/TypeError that names the offending argument, sizes, dtypes or devices."""
    from ..functional import _check_float

    for n, v in (("x", x), ("weight", weight), ("target", target)):
        if not isinstance(v, Tensor):
            raise TypeError(f"{n} must be a torch.Tensor, got {type(v).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (..., d_model); got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be 2-D [vocab, d_model] (nn.Linear layout) with vocab >= 1, "
                         f"got {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"last dimension of x is {x.shape[-1]} but weight {tuple(weight.shape)} expects "
                         f"d_model={weight.shape[1]} (weight is [vocab, d_model], nn.Linear layout)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must hold class indices as int64 or int32, got {target.dtype}")
    if tuple(target.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"target has shape {tuple(target.shape)} but x {tuple(x.shape)} has "
                         f"{tuple(x.shape[:-1])} tokens; they must match")
    named = [("x", x), ("weight", weight)] + ([("bias", bias)] if bias is not None else [])
    for n, t in named:
        _check_float(t, n)
    if len({t.device for _, t in named + [("target", target)]}) > 1:
        raise ValueError("x, weight, bias and target must be on one device, got "
                         + ", ".join(f"{n} on {t.device}" for n, t in named + [("target", target)]))
    if len({t.dtype for _, t in named}) > 1:
        raise TypeError("x, weight and bias must share one dtype outside autocast, got "
                        + ", ".join(f"{n} {t.dtype}" for n, t in named))
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}")
    if softcap is not None and not (float(softcap) > 0 and math.isfinite(float(softcap))):
        raise ValueError(f"softcap must be None or a positive finite number, got {softcap!r}")
    if not (float(z_loss) >= 0 and math.isfinite(float(z_loss))):
        raise ValueError(f"z_loss must be a non-negative finite number, got {z_loss!r}")
    if num_items is not None:
        if reduction != "sum":
            raise ValueError(f"num_items divides the summed loss: it needs reduction='sum', got {reduction!r}")
        if not isinstance(num_items, Tensor) and not float(num_items) > 0:
            raise ValueError(f"num_items must be positive, got {num_items!r}")
    if recompute not in (True, False):
        raise ValueError(f"recompute must be True or False, got {recompute!r}")


def fused_linear_cross_entropy(
    x: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None, *, ignore_index: int = -100,
    label_smoothing: float = 0.0, reduction: str = "mean", softcap: Optional[float] = None,
    z_loss: float = 0.0, num_items=None, recompute: bool = True, return_details: bool = False,
    chunk_tokens: int = 0, chunk_vocab: int = 0, backend: str = "auto",
):
    """Cross-entropy of an LM head's logits without materialising them.

    Args:
        x: ``(..., d_model)`` hidden states; target: ``(...)`` class indices (int64/int32).
        weight, bias: the head in ``nn.Linear`` layout, ``[V, d_model]`` and ``[V]`` (or None);
            a tied embedding matrix works as is.
        ignore_index, label_smoothing, reduction: as in ``F.cross_entropy``.
        softcap: Gemma-2's final logit softcapping, ``softcap * tanh(logits / softcap)``.
        z_loss: adds ``z_loss * lse**2`` per non-ignored token (PaLM).
        num_items: with ``reduction="sum"``, divide the sum by it (Hugging Face's
            ``num_items_in_batch``); an int/float or a 0-d tensor.
        recompute: True keeps x and one fp32 log-sum-exp per token and recomputes the logits
            in backward; False forms dX and dW during the forward and keeps them (no GEMM in
            backward; needs reduction "mean" or "sum"). See :mod:`fused_ckpt.ops.linear_ce`.
        return_details: return a :class:`LinearCrossEntropyOutput` with the per-token losses
            and the z-loss term as well.
        chunk_tokens, chunk_vocab: chunk sizes (0: automatic, :func:`chunk_sizes`).
        backend: "auto", "triton" or "aten".

    The loss is fp32 whatever x's dtype (float64 inputs: float64, on the aten backend).

    Equivalent PyTorch::

        logits = F.linear(x, weight, bias).float()
        if softcap: logits = softcap * torch.tanh(logits / softcap)
        loss = F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=ignore_index,
                               label_smoothing=label_smoothing, reduction="none")
        loss = loss + z_loss * logits.logsumexp(-1).flatten() ** 2 * (target.flatten() != ignore_index)
        loss = loss.sum() / num_items  (or .mean() over non-ignored tokens, .sum(), per token)
    """
    from ..backend import resolve_backend

    if (isinstance(x, Tensor) and x.dim() > 0 and x.device.type in _AUTOCAST_DEVICES
            and torch.is_autocast_enabled(x.device.type)):
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = bias.to(dt) if bias is not None else None
    check_linear_ce_inputs(x, weight, target, bias, ignore_index, label_smoothing, reduction, softcap,
                           z_loss, num_items, recompute)
    for n, v in (("chunk_tokens", chunk_tokens), ("chunk_vocab", chunk_vocab)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{n} must be a non-negative int (0 = automatic), got {v!r}")
    be = resolve_backend(backend, x.device, x.dtype)
    red = REDUCTIONS[reduction]
    scale = 1.0 / float(num_items) if num_items is not None and not isinstance(num_items, Tensor) else 1.0
    grad_needed = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    save = 0 if (recompute or not grad_needed) else 1
    if save == 1 and red == 0:
        raise ValueError("recompute=False forms the gradients during the forward, before a per-token "
                         "upstream gradient exists: it needs reduction='mean' or 'sum'")
    needs = [x.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad]
    with torch.autocast(x.device.type, enabled=False):
        loss, losses, z_term, _, _, _, _ = linear_ce_forward(
            x, weight, bias, target, ignore_index, float(label_smoothing), float(softcap or 0.0),
            float(z_loss), red, scale, save, needs, chunk_tokens, chunk_vocab, be)
    if red == 0:
        loss = losses
    elif isinstance(num_items, Tensor):
        loss = loss / num_items.to(loss.device)
        z_term = z_term / num_items.to(loss.device)
    if return_details:
        return LinearCrossEntropyOutput(loss, losses.detach(), z_term.detach())
    return loss
