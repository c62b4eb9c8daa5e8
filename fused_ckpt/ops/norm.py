"""RMSNorm and LayerNorm as ``torch.library`` custom ops with autograd: the recompute contract.

    RMSNorm:    y = x * rstd * w,                rstd = 1 / sqrt(mean(x^2) + eps)
    LayerNorm:  y = (x - mean) * rstd * w + b,   rstd = 1 / sqrt(var(x) + eps)  (biased var)

over the last dimension, computed in fp32 and rounded once to x's dtype (Llama style for
RMSNorm). The per-row statistics (shape ``x.shape[:-1]``, fp32; fp64 for fp64 inputs on the
aten backend) are outputs of the forward op, so a checkpointed block can keep them.

Recompute contract:

=================================  ==============================  ===========================
op                                 saved for backward              recomputed in backward
=================================  ==============================  ===========================
rms_norm_forward                   x, rstd  (plus the weight)      xhat = x * rstd
layer_norm_forward                 x, mean, rstd  (plus weight)    xhat = (x - mean) * rstd
rms_norm_apply / layer_norm_apply  x, the given statistics         xhat, as above
                                   (plus weight)
=================================  ==============================  ===========================

Nothing else is kept (not y, not xhat); the bias is never saved (db = sum(dy)). The backward
never re-reduces the statistics: with g = dy * w,

    dx = rstd * (g - xhat * mean(g * xhat))                    (RMSNorm)
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat))          (LayerNorm)
    dw = sum_rows(dy * xhat),   db = sum_rows(dy)              (fp32, reduced deterministically)

The ``*_apply`` ops recompute y from x and statistics saved earlier (a checkpointed block
keeps only x and the statistics, then re-applies the norm in its backward). Their backward is
the true norm backward above: the statistics are treated as the functions of x they are, so
the gradient flows to x and the weight only; the statistics themselves get no gradient (the
forward ops mark them non-differentiable).

Everything kept goes through ``ctx.save_for_backward``; the weight is saved as the tensor the
module holds (no copy), so ``saved_tensors_hooks`` see exactly x and the statistics as the
non-parameter bytes. Under ``no_grad`` nothing is saved.

Backends: "triton" (:mod:`fused_ckpt.kernels.norm`) and "aten" (the same math in plain
PyTorch; fp64 allowed). Both keep the same tensors.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..backend import check_backend_dtype, resolve_backend
from ._autograd import guard_double_backward

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_AUTOCAST_DEVICES = ("cuda", "cpu", "xpu")


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the per-row statistics for inputs of ``dtype``: fp32 (fp64 for fp64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def norm_saved_bytes(rows: int, width: int, elem_size: int, layer_norm: bool) -> int:
    """Bytes the forward op keeps for backward besides the weight: x plus the fp32 statistics
    (rstd; mean too for LayerNorm). Tests check it against saved_tensors_hooks."""
    return rows * width * elem_size + rows * 4 * (2 if layer_norm else 1)


def _empty(ref: Tensor) -> Tensor:
    """Placeholder for an output that was not asked for (custom ops return tensors only)."""
    return ref.new_empty((0,))


# --------------------------------------------------------------------------- aten backend
def _aten_fwd(x2: Tensor, w: Optional[Tensor], b: Optional[Tensor], eps: float, rms: bool,
              mean: Optional[Tensor] = None, rstd: Optional[Tensor] = None):
    acc = stats_dtype(x2.dtype)
    xf = x2.to(acc)
    if rstd is None:
        if rms:
            rstd = torch.rsqrt(xf.square().mean(-1) + eps)
        else:
            mean = xf.mean(-1)
            rstd = torch.rsqrt((xf - mean[:, None]).square().mean(-1) + eps)
    xhat = xf * rstd[:, None] if rms else (xf - mean[:, None]) * rstd[:, None]
    y = xhat * w.to(acc) if w is not None else xhat
    if b is not None:
        y = y + b.to(acc)
    return y.to(x2.dtype), mean, rstd


def _aten_bwd(dy2: Tensor, x2: Tensor, w: Optional[Tensor], mean: Optional[Tensor], rstd: Tensor,
              rms: bool, need_dx: bool, need_dw: bool, need_db: bool):
    acc = stats_dtype(x2.dtype)
    xf, dyf = x2.to(acc), dy2.to(acc)
    rstd = rstd.to(acc)[:, None]
    xhat = xf * rstd if rms else (xf - mean.to(acc)[:, None]) * rstd
    dx = dw = db = None
    if need_dx:
        g = dyf * w.to(acc) if w is not None else dyf
        c1 = (g * xhat).mean(-1, keepdim=True)
        dx = g - xhat * c1 if rms else g - g.mean(-1, keepdim=True) - xhat * c1
        dx = (dx * rstd).to(x2.dtype)
    if need_dw:
        dw = (dyf * xhat).sum(0)
    if need_db:
        db = dyf.sum(0)
    return dx, dw, db


# --------------------------------------------------------------------------- shared impls
def _unit_stride(t: Optional[Tensor]) -> Optional[Tensor]:
    """The Triton kernels read weight and bias [N] as contiguous: a strided one is copied."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _offset_weight(w: Optional[Tensor], offset: float, x: Tensor) -> Optional[Tensor]:
    """The weight the math multiplies by: ``w`` itself, or ``w.float() + offset`` (Gemma's
    ``(1 + w)`` RMSNorm) computed in the statistics dtype, as Hugging Face computes it; the
    kernels and the aten math read any weight dtype and compute in fp32."""
    if not offset:
        return w
    if w is None:
        raise ValueError(f"a weight offset ({offset}) needs a weight")
    return w.to(stats_dtype(x.dtype)) + offset


def _fwd(x: Tensor, w, b, eps: float, rms: bool, backend: str, mean=None, rstd=None, offset: float = 0.0):
    """(y shaped like x, mean or None, rstd), statistics shaped ``x.shape[:-1]``."""
    w = _offset_weight(w, offset, x)
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    sd = stats_dtype(x.dtype)
    if rstd is not None:
        rstd = rstd.reshape(-1).to(sd).contiguous()
        mean = mean.reshape(-1).to(sd).contiguous() if mean is not None else None
    if backend == "triton":
        from ..kernels.norm import norm_fwd

        check_backend_dtype(backend, x.dtype, "x")
        y, mean, rstd = norm_fwd(x2, _unit_stride(w), _unit_stride(b), eps, rms, mean, rstd)
    else:
        y, mean, rstd = _aten_fwd(x2, w, b, eps, rms, mean, rstd)
    rows = x.shape[:-1]
    return y.view(x.shape), (mean.view(rows) if mean is not None else None), rstd.view(rows)


def _bwd(dy: Tensor, x: Tensor, w, mean, rstd: Tensor, rms: bool, needs: list, backend: str,
         offset: float = 0.0):
    """(dx, dw, db) with empty placeholders for the ones ``needs`` does not flag. With an
    ``offset`` the math multiplies by ``w + offset``, whose gradient is dw itself."""
    need_dx, need_dw, need_db = needs
    need_dw = need_dw and w is not None
    w_dtype = w.dtype if w is not None else None
    w = _offset_weight(w, offset, x)
    N = x.shape[-1]
    x2, dy2 = x.reshape(-1, N), dy.reshape(-1, N)
    rstd = rstd.reshape(-1).contiguous()
    mean = mean.reshape(-1).contiguous() if mean is not None else None
    if backend == "triton":
        from ..kernels.norm import norm_bwd

        check_backend_dtype(backend, x.dtype, "x")
        dx, dw, db = norm_bwd(dy2, x2, _unit_stride(w), mean, rstd, rms, need_dx, need_dw, need_db)
    else:
        dx, dw, db = _aten_bwd(dy2, x2, w, mean, rstd, rms, need_dx, need_dw, need_db)
    return (dx.view(x.shape) if dx is not None else _empty(x),
            dw.to(w_dtype) if dw is not None else _empty(x),
            db.to(dy.dtype) if db is not None else _empty(x))


def _fake_bwd(dy, x, w, needs):
    need_dx, need_dw, need_db = needs
    return (x.new_empty(x.shape) if need_dx else _empty(x),
            w.new_empty(w.shape) if (need_dw and w is not None) else _empty(x),
            dy.new_empty(x.shape[-1:]) if need_db else _empty(x))


def _fake_stats(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[:-1], dtype=stats_dtype(x.dtype))


# --------------------------------------------------------------------------- the ops
@torch.library.custom_op("fused_ckpt::rms_norm_forward", mutates_args=())
def rms_norm_forward(x: Tensor, weight: Optional[Tensor], eps: float, backend: str,
                     offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """(y, rstd): y like x; rstd [x.shape[:-1]] fp32. Saves x, rstd (and weight) for backward.
    ``offset``: y = xhat * (weight + offset) (1.0: Gemma's ``(1 + w)``)."""
    y, _, rstd = _fwd(x, weight, None, eps, True, backend, offset=offset)
    return y, rstd


@rms_norm_forward.register_fake
def _(x, weight, eps, backend, offset=0.0):
    return x.new_empty(x.shape), _fake_stats(x)


@torch.library.custom_op("fused_ckpt::layer_norm_forward", mutates_args=())
def layer_norm_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                       backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd): y like x; mean, rstd [x.shape[:-1]] fp32. Saves x, mean, rstd (and
    weight) for backward."""
    return _fwd(x, weight, bias, eps, False, backend)


@layer_norm_forward.register_fake
def _(x, weight, bias, eps, backend):
    return x.new_empty(x.shape), _fake_stats(x), _fake_stats(x)


@torch.library.custom_op("fused_ckpt::rms_norm_apply", mutates_args=())
def rms_norm_apply(x: Tensor, weight: Optional[Tensor], rstd: Tensor, backend: str,
                   offset: float = 0.0) -> Tensor:
    """y = x * rstd * (weight + offset) from saved statistics (no reduction). Saves x, rstd
    (and weight)."""
    return _fwd(x, weight, None, 0.0, True, backend, None, rstd, offset)[0]


@rms_norm_apply.register_fake
def _(x, weight, rstd, backend, offset=0.0):
    return x.new_empty(x.shape)


@torch.library.custom_op("fused_ckpt::layer_norm_apply", mutates_args=())
def layer_norm_apply(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                     rstd: Tensor, backend: str) -> Tensor:
    """y = (x - mean) * rstd * weight + bias from saved statistics. Saves x, mean, rstd (and
    weight)."""
    return _fwd(x, weight, bias, 0.0, False, backend, mean, rstd)[0]


@layer_norm_apply.register_fake
def _(x, weight, bias, mean, rstd, backend):
    return x.new_empty(x.shape)


@torch.library.custom_op("fused_ckpt::rms_norm_backward", mutates_args=())
def rms_norm_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], rstd: Tensor,
                      needs_grad: list[bool], backend: str, offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """(dx, dweight); ``needs_grad`` flags them in that order, an unflagged one is an empty
    placeholder. Uses only x, weight, rstd and dy (and the forward's ``offset``)."""
    dx, dw, _ = _bwd(dy, x, weight, None, rstd, True, list(needs_grad) + [False], backend, offset)
    return dx, dw


@rms_norm_backward.register_fake
def _(dy, x, weight, rstd, needs_grad, backend, offset=0.0):
    return _fake_bwd(dy, x, weight, list(needs_grad) + [False])[:2]


@torch.library.custom_op("fused_ckpt::layer_norm_backward", mutates_args=())
def layer_norm_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                        needs_grad: list[bool], backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias), flagged by ``needs_grad`` in that order (else empty). Uses only
    x, weight, mean, rstd and dy."""
    return _bwd(dy, x, weight, mean, rstd, False, list(needs_grad), backend)


@layer_norm_backward.register_fake
def _(dy, x, weight, mean, rstd, needs_grad, backend):
    return _fake_bwd(dy, x, weight, list(needs_grad))


# --------------------------------------------------------------------------- autograd
def _setup_rms(ctx, inputs, output):
    x, weight = inputs[0], inputs[1]
    rstd = output[1]
    ctx.save_for_backward(x, weight, rstd)
    ctx.mark_non_differentiable(rstd)
    ctx.backend, ctx.offset = inputs[3], (inputs[4] if len(inputs) > 4 else 0.0)
    ctx.n_inputs = len(inputs)


def _setup_ln(ctx, inputs, output):
    x, weight = inputs[0], inputs[1]
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.backend = inputs[-1]


def _setup_rms_apply(ctx, inputs, output):
    x, weight, rstd, backend = inputs[:4]
    ctx.save_for_backward(x, weight, rstd)
    ctx.backend, ctx.offset = backend, (inputs[4] if len(inputs) > 4 else 0.0)
    ctx.n_inputs = len(inputs)


def _setup_ln_apply(ctx, inputs, output):
    x, weight, _, mean, rstd, backend = inputs
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.backend = backend


def _rms_grads(ctx, grad_y):
    x, weight, rstd = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:2])
    with torch.no_grad():
        grads = rms_norm_backward(grad_y, x, weight, rstd, needs, ctx.backend, ctx.offset)
    grads = guard_double_backward(grads, (grad_y, x, weight), "rms_norm / layer_norm")
    return tuple(g if n else None for g, n in zip(grads, needs))


def _ln_grads(ctx, grad_y, bias_index):
    x, weight, mean, rstd = ctx.saved_tensors
    needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[bias_index]]
    with torch.no_grad():
        grads = layer_norm_backward(grad_y, x, weight, mean, rstd, needs, ctx.backend)
    grads = guard_double_backward(grads, (grad_y, x, weight), "rms_norm / layer_norm")
    return tuple(g if n else None for g, n in zip(grads, needs))


def _backward_rms(ctx, grad_y, grad_rstd):
    return _rms_grads(ctx, grad_y) + (None,) * (ctx.n_inputs - 2)


def _backward_ln(ctx, grad_y, grad_mean, grad_rstd):
    return _ln_grads(ctx, grad_y, 2) + (None, None)


def _backward_rms_apply(ctx, grad_y):
    return _rms_grads(ctx, grad_y) + (None,) * (ctx.n_inputs - 2)


def _backward_ln_apply(ctx, grad_y):
    return _ln_grads(ctx, grad_y, 2) + (None, None, None)


rms_norm_forward.register_autograd(_backward_rms, setup_context=_setup_rms)
layer_norm_forward.register_autograd(_backward_ln, setup_context=_setup_ln)
rms_norm_apply.register_autograd(_backward_rms_apply, setup_context=_setup_rms_apply)
layer_norm_apply.register_autograd(_backward_ln_apply, setup_context=_setup_ln_apply)


# --------------------------------------------------------------------------- functional
def check_norm_inputs(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor] = None,
                      stats: tuple = ()) -> None:
    """Raise a TypeError/ValueError naming the offending shape, dtype or device."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension to normalize, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be a floating-point tensor (float32/float16/bfloat16, or float64 on the "
                        f"aten backend), got {x.dtype}")
    N = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != (N,):
            raise ValueError(f"{name} has shape {tuple(t.shape)} but x's last dimension is {N} "
                             f"(x {tuple(x.shape)}); expected ({N},)")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from x dtype {x.dtype}; cast one of "
                            "them (outside autocast the norm does not mix dtypes)")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    rows = math.prod(x.shape[:-1])
    for name, t in stats:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point (fp32 statistics), got {t.dtype}")
        if t.numel() != rows:
            raise ValueError(f"{name} has {t.numel()} elements but x {tuple(x.shape)} has {rows} "
                             "rows; expected one statistic per row (shape x.shape[:-1])")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _prepare(x: Tensor, weight, bias, backend: str, stats: tuple = ()):
    """Autocast casts, input checks and backend choice: (x, weight, bias, backend)."""
    if (isinstance(x, Tensor) and x.device.type in _AUTOCAST_DEVICES
            and torch.is_autocast_enabled(x.device.type)):
        dt = torch.get_autocast_dtype(x.device.type)
        x = x.to(dt)
        weight = weight.to(dt) if weight is not None else None
        bias = bias.to(dt) if bias is not None else None
    check_norm_inputs(x, weight, bias, stats)
    be = resolve_backend(backend, x.device, x.dtype)  # float64: "aten", or a TypeError for "triton"
    if be == "triton":
        from ..kernels.norm import MAX_N

        if x.shape[-1] > MAX_N:
            if backend == "triton":
                raise ValueError(f"the Triton norm kernels do not support rows of width {x.shape[-1]} "
                                 f"(the kernels take up to {MAX_N}); use backend='aten'")
            be = "aten"  # "auto" falls back to the plain-PyTorch backend
    return x, weight, bias, be


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float = 1e-6, backend: str = "auto", *,
             return_stats: bool = False, offset: float = 0.0):
    """RMSNorm over the last dimension (Llama style: fp32 math, one rounding to x's dtype).

    Args:
        x: ``(..., N)``, float32/float16/bfloat16 (float64 on the aten backend).
        weight: ``(N,)`` in x's dtype, or None (no elementwise affine).
        eps: added to the mean square.
        backend: "auto", "triton" or "aten" (see :mod:`fused_ckpt.backend`).
        return_stats: also return ``rstd`` (``x.shape[:-1]``, fp32, no gradient) for
            :func:`rms_norm_apply_stats`.
        offset: multiply by ``weight.float() + offset`` instead of the weight (1.0: the Gemma
            family's ``(1 + w)`` RMSNorm; the offset weight is formed in fp32 inside the op,
            so nothing besides x, rstd and the weight is kept).

    Saves x and rstd for backward (plus the weight); see the module docstring.

    Equivalent PyTorch::

        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * (weight.float() + offset)).to(x.dtype)
    """
    x, weight, _, be = _prepare(x, weight, None, backend)
    if offset and weight is None:
        raise ValueError(f"rms_norm: offset={offset} needs a weight (y = xhat * (weight + offset))")
    with torch.autocast(x.device.type, enabled=False):
        y, rstd = rms_norm_forward(x, weight, float(eps), be, float(offset))
    return (y, rstd) if return_stats else y


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5,
               backend: str = "auto", *, return_stats: bool = False):
    """LayerNorm over the last dimension (fp32 math, one rounding to x's dtype).

    Args:
        x: ``(..., N)``, float32/float16/bfloat16 (float64 on the aten backend).
        weight, bias: ``(N,)`` in x's dtype, or None.
        eps: added to the (biased) variance.
        backend: "auto", "triton" or "aten".
        return_stats: also return ``mean`` and ``rstd`` (``x.shape[:-1]``, fp32, no gradient)
            for :func:`layer_norm_apply_stats`.

    Saves x, mean and rstd for backward (plus the weight).

    Equivalent PyTorch::

        y = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], weight.float(),
                                           bias.float(), eps).to(x.dtype)
    """
    x, weight, bias, be = _prepare(x, weight, bias, backend)
    with torch.autocast(x.device.type, enabled=False):
        y, mean, rstd = layer_norm_forward(x, weight, bias, float(eps), be)
    return (y, mean, rstd) if return_stats else y


def rms_norm_apply_stats(x: Tensor, weight: Optional[Tensor], rstd: Tensor, backend: str = "auto", *,
                         offset: float = 0.0) -> Tensor:
    """Recompute ``rms_norm(x, weight)`` from its saved ``rstd`` (no reduction over the row).

    Differentiable w.r.t. x and weight with the true RMSNorm gradient (rstd is treated as the
    function of x it is); rstd gets no gradient. Saves x and rstd (plus the weight).

    Equivalent PyTorch::

        y = (x.float() * rstd[..., None] * (weight.float() + offset)).to(x.dtype)
        # with the gradient of rms_norm(x, weight, offset=offset) flowing to x and weight
    """
    x, weight, _, be = _prepare(x, weight, None, backend, (("rstd", rstd),))
    if offset and weight is None:
        raise ValueError(f"rms_norm_apply_stats: offset={offset} needs a weight")
    with torch.autocast(x.device.type, enabled=False):
        return rms_norm_apply(x, weight, rstd.detach(), be, float(offset))


def layer_norm_apply_stats(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                           rstd: Tensor, backend: str = "auto") -> Tensor:
    """Recompute ``layer_norm(x, weight, bias)`` from its saved ``mean`` and ``rstd``.

    Differentiable w.r.t. x, weight and bias with the true LayerNorm gradient; the statistics
    get no gradient. Saves x, mean and rstd (plus the weight).

    Equivalent PyTorch::

        y = ((x.float() - mean[..., None]) * rstd[..., None] * weight.float() + bias.float()).to(x.dtype)
        # with the gradient of layer_norm(x, weight, bias) flowing to x, weight and bias
    """
    x, weight, bias, be = _prepare(x, weight, bias, backend, (("mean", mean), ("rstd", rstd)))
    with torch.autocast(x.device.type, enabled=False):
        return layer_norm_apply(x, weight, bias, mean.detach(), rstd.detach(), be)
