"""Functional forms of the fused ops: input checks, autocast and backend choice, then the op."""
from __future__ import annotations

import torch
from torch import Tensor

from .activations import get_activation
from .backend import resolve_backend

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_AUTOCAST_DEVICES = ("cuda", "cpu", "xpu")


def _check_float(t: Tensor, what: str) -> None:
    if t.dtype not in _FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"{what} must be a floating-point tensor (float32/float16/bfloat16, or float64 on "
                        f"the aten backend), got {t.dtype}")


def check_ffn_inputs(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
                     activation: str, w_up: Tensor | None = None, b_up: Tensor | None = None) -> None:
    """Raise a ValueError/TypeError that names the offending sizes, dtypes or devices."""
    act = get_activation(activation)
    if w_up is not None:
        _check_split_fc1(w1, b1, w_up, b_up, w2, act)
    elif b_up is not None:
        raise ValueError("b_up (the up bias) was given without w_up (the up weight)")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (..., d_model); got a 0-d tensor")
    if w1.dim() != 2 or w2.dim() != 2:
        raise ValueError(f"w1 and w2 must be 2-D, got w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)}")
    d_model = w1.shape[1]
    if d_model == 0:
        raise ValueError(f"the FFN has d_model=0 (fc1.weight {tuple(w1.shape)}); d_model must be positive")
    if x.shape[-1] != d_model:
        raise ValueError(f"last dimension of x is {x.shape[-1]} but the FFN has d_model={d_model} "
                         f"(x {tuple(x.shape)}, fc1.weight {tuple(w1.shape)})")
    d_ff = w2.shape[1]
    rows = w1.shape[0] * (2 if w_up is not None else 1)  # fc1 rows, both halves of a split weight
    if rows != act.fc1_rows(d_ff):
        kind = f"2*d_ff={2 * d_ff} (gated {act.name!r})" if act.gated else f"d_ff={d_ff}"
        raise ValueError(f"fc1.weight has {w1.shape[0]} rows, expected {kind} to match fc2.weight {tuple(w2.shape)}")
    if w2.shape[0] != d_model:
        raise ValueError(f"fc2.weight {tuple(w2.shape)} must map d_ff={d_ff} back to d_model={d_model}")
    if b1 is not None and w_up is None and tuple(b1.shape) != (w1.shape[0],):
        raise ValueError(f"fc1.bias has shape {tuple(b1.shape)}, expected ({w1.shape[0]},)")
    if b2 is not None and tuple(b2.shape) != (d_model,):
        raise ValueError(f"fc2.bias has shape {tuple(b2.shape)}, expected ({d_model},)")
    named = [("x", x), ("fc1.weight", w1), ("fc2.weight", w2)]
    named += [(n, t) for n, t in (("fc1.bias", b1), ("fc2.bias", b2), ("up weight", w_up), ("up bias", b_up))
              if t is not None]
    for n, t in named:
        _check_float(t, n)
    devices = {t.device for _, t in named}
    if len(devices) > 1:
        raise ValueError("all FFN tensors must be on one device, got "
                         + ", ".join(f"{n} on {t.device}" for n, t in named))
    dtypes = {t.dtype for _, t in named}
    if len(dtypes) > 1:
        raise TypeError("FFN tensors must share one dtype outside autocast, got "
                        + ", ".join(f"{n} {t.dtype}" for n, t in named))


def _check_split_fc1(wg, bg, wu, bu, w2, act) -> None:
    """Separate gate and up weights: both ``[d_ff, d_model]``, biases both present or absent."""
    if not act.gated:
        raise ValueError(f"w_up (a separate up weight) needs a gated activation, got {act.name!r}")
    if not isinstance(wu, Tensor) or wu.dim() != 2 or wg.dim() != 2 or tuple(wu.shape) != tuple(wg.shape):
        raise ValueError(f"the gate weight {tuple(wg.shape)} and the up weight "
                         f"{tuple(getattr(wu, 'shape', ()))} must have the same shape [d_ff, d_model]")
    if wg.shape[0] != w2.shape[-1]:
        raise ValueError(f"the gate weight has {wg.shape[0]} rows, expected d_ff={w2.shape[-1]} to match "
                         f"fc2.weight {tuple(w2.shape)}")
    if (bg is None) != (bu is None):
        raise ValueError("the gate and up projections must both have a bias or neither "
                         f"(gate bias {'given' if bg is not None else 'None'}, up bias "
                         f"{'given' if bu is not None else 'None'})")
    if bu is not None and tuple(bu.shape) != (wu.shape[0],):
        raise ValueError(f"the up bias has shape {tuple(bu.shape)}, expected ({wu.shape[0]},)")
    if bg is not None and tuple(bg.shape) != (wg.shape[0],):
        raise ValueError(f"the gate bias has shape {tuple(bg.shape)}, expected ({wg.shape[0]},)")


FFN_RECOMPUTE = (True, False, "none")


def ffn_save_count(recompute) -> int:
    """The FFN dial as the op takes it: tensors kept besides x (True: 0, False: 1, "none": 2)."""
    if recompute is True:
        return 0
    if recompute is False:
        return 1
    if recompute == "none":
        return 2
    raise ValueError(f"recompute must be one of {FFN_RECOMPUTE}, got {recompute!r}")


def fused_ffn(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None,
              activation: str = "gelu", recompute: bool = True, *, chunk_tokens: int = 0,
              backend: str = "auto", w_up: Tensor | None = None, b_up: Tensor | None = None,
              dropout_p: float = 0.0, lora: dict | None = None, lora_dropout: float = 0.0) -> Tensor:
    """Fused FFN ``act(x W1^T + b1) W2^T + b2`` whose backward recomputes the hidden layer.

    Args:
        x: ``(..., d_model)``.
        w1, b1: fc1 in ``nn.Linear`` layout, ``[d_ff, d_model]`` (gated activations:
            ``[2*d_ff, d_model]``, gate rows first, then up rows); ``b1`` may be None.
        w2, b2: fc2, ``[d_model, d_ff]``; ``b2`` may be None.
        activation: one of :data:`fused_ckpt.activations.ACTIVATIONS`.
        recompute: True keeps only ``x`` for backward; False keeps ``x`` and the
            pre-activation; "none" keeps x, the pre-activation and the activation, as eager
            autograd would (see :mod:`fused_ckpt.ops.ffn` for the full contract).
        chunk_tokens: tokens per backward chunk; 0 picks a size that bounds the
            ``tokens x d_ff`` temporaries (:func:`fused_ckpt.ops.ffn.default_chunk_tokens`).
        backend: "auto", "triton" or "aten" (see :mod:`fused_ckpt.backend`).
        w_up, b_up: gated activations only: the up projection as its own ``[d_ff, d_model]``
            weight (and bias), ``w1`` / ``b1`` then being the gate's (Llama's ``gate_proj`` /
            ``up_proj``). Read where they live (any strides), never concatenated; each gets its
            own gradient.
        dropout_p: dropout on the output (GPT-2's MLP ``dropout(c_proj(...))``), applied
            whenever > 0 (a module passes 0 in eval mode); the mask is replayed in backward
            from a Philox seed drawn from torch's default generator, nothing else is saved
            (:mod:`fused_ckpt.ops.dropout`).
        lora: LoRA adapters on frozen base weights (PEFT's vanilla LoRA), a dict with any of the
            keys "fc1" (the gate, or the packed / ungated fc1), "up" (the separate up weight)
            and "fc2", each ``(A [r, in], B [out, r], scaling)`` (in x's dtype, or float32 for a
            16-bit x as PEFT keeps them by default): each projection becomes
            ``linear(x, W, b) + scaling * linear(linear(drop(x), A), B)``. The base weights
            must not require grad (no dW is computed for them); A and B get gradients; kept for
            backward: x and each adapter's ``[tokens, r]`` product (plus the pre-activation
            when ``recompute`` is not True). See :mod:`fused_ckpt.ops.ffn_lora`.
        lora_dropout: dropout on each adapter's input (p of PEFT's ``lora_dropout``), applied
            whenever > 0 (a module passes 0 in eval mode); one mask per projection from a
            Philox seed drawn from torch's default generator, regenerated in backward.

    Equivalent PyTorch::

        z = torch.nn.functional.linear(x, w1, b1)
        h = act(z)                                  # gated: act(z[..., :f]) * z[..., f:]
        y = torch.nn.functional.linear(h, w2, b2)
        # with w_up: h = act(linear(x, w1, b1)) * linear(x, w_up, b_up)
        y = torch.nn.functional.dropout(y, dropout_p)   # with the replayed mask
        # with lora: z_p += scaling_p * linear(linear(dropout(input_p, lora_dropout), A_p), B_p)
    """
    from .ops.ffn import ffn_forward

    if lora is not None:
        return _fused_ffn_lora(x, w1, b1, w2, b2, activation, recompute, chunk_tokens, backend, w_up, b_up,
                               dropout_p, lora, lora_dropout)

    if (isinstance(x, Tensor) and x.dim() > 0 and x.device.type in _AUTOCAST_DEVICES
            and torch.is_autocast_enabled(x.device.type)):
        dt = torch.get_autocast_dtype(x.device.type)
        x, w1, w2 = x.to(dt), w1.to(dt), w2.to(dt)
        b1 = b1.to(dt) if b1 is not None else None
        b2 = b2.to(dt) if b2 is not None else None
        w_up = w_up.to(dt) if w_up is not None else None
        b_up = b_up.to(dt) if b_up is not None else None
    check_ffn_inputs(x, w1, b1, w2, b2, activation, w_up, b_up)
    save = ffn_save_count(recompute)
    if not isinstance(chunk_tokens, int) or chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be a non-negative int (0 = automatic), got {chunk_tokens!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    be = resolve_backend(backend, x.device, x.dtype)
    tensors = (x, w1, b1, w2, b2, w_up, b_up)
    grad_needed = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    with torch.autocast(x.device.type, enabled=False):
        if w_up is None:
            y, _, _ = ffn_forward(x, w1, b1, w2, b2, activation, save if grad_needed else 0,
                                  chunk_tokens, be)
        else:
            y, _, _ = ffn_forward(x, w1, b1, w2, b2, activation, save if grad_needed else 0,
                                  chunk_tokens, be, w_up, b_up)
        if dropout_p:
            from .ops.dropout import replayed_dropout

            y = replayed_dropout(y, dropout_p, be)
    return y


_LORA_KEYS = ("fc1", "up", "fc2")


def lora_dtype_ok(factor_dtype: torch.dtype, x_dtype: torch.dtype) -> bool:
    """LoRA factors in x's dtype, or in float32 over a 16-bit x (PEFT's ``autocast_adapter_dtype``
    default: the adapter math in fp32, its sum with the base output rounded once)."""
    return factor_dtype == x_dtype or (factor_dtype == torch.float32 and x_dtype in (torch.float16, torch.bfloat16))


def _fused_ffn_lora(x, w1, b1, w2, b2, activation, recompute, chunk_tokens, backend, w_up, b_up, dropout_p,
                    lora, lora_dropout):
    """:func:`fused_ffn` with LoRA adapters (:mod:`fused_ckpt.ops.ffn_lora`)."""
    from .ops.ffn_lora import ffn_lora_forward

    check_ffn_inputs(x, w1, b1, w2, b2, activation, w_up, b_up)
    save = min(ffn_save_count(recompute), 1)
    if not isinstance(chunk_tokens, int) or chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be a non-negative int (0 = automatic), got {chunk_tokens!r}")
    for name, p in (("dropout_p", dropout_p), ("lora_dropout", lora_dropout)):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"{name} must be a number in [0, 1), got {p!r}")
    if not isinstance(lora, dict) or set(lora) - set(_LORA_KEYS):
        raise ValueError(f"lora must be a dict with keys among {_LORA_KEYS}, got {lora!r:.200}")
    if "up" in lora and w_up is None:
        raise ValueError("lora['up'] needs a separate up weight (w_up)")
    base = (w1, b1, w2, b2, w_up, b_up)
    if any(t is not None and t.requires_grad for t in base) and torch.is_grad_enabled():
        raise ValueError("fused_ffn with lora: the base weights and biases must be frozen (requires_grad=False), "
                         "as PEFT sets them; no gradient is computed for them")
    outs = {"fc1": w1.shape[0], "up": w_up.shape[0] if w_up is not None else 0, "fc2": w2.shape[0]}
    ins = {"fc1": w1.shape[1], "up": w1.shape[1], "fc2": w2.shape[1]}
    factors, scaling = [], []
    for key in _LORA_KEYS:
        f = lora.get(key)
        if f is None:
            factors += [None, None]
            scaling.append(0.0)
            continue
        if not isinstance(f, (tuple, list)) or len(f) != 3:
            raise ValueError(f"lora[{key!r}] must be (A, B, scaling), got {type(f).__name__}")
        a, b, s = f
        if not isinstance(a, Tensor) or not isinstance(b, Tensor) or a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"lora[{key!r}]: A and B must be 2-D tensors")
        r = a.shape[0]
        if a.shape != (r, ins[key]) or b.shape != (outs[key], r) or r == 0:
            raise ValueError(f"lora[{key!r}]: A {tuple(a.shape)} and B {tuple(b.shape)} must be [r, {ins[key]}] and "
                             f"[{outs[key]}, r] with r > 0")
        if not lora_dtype_ok(a.dtype, x.dtype) or b.dtype != a.dtype or a.device != x.device or b.device != x.device:
            raise ValueError(f"lora[{key!r}]: A and B must share one dtype, x's ({x.dtype}) or float32 for a 16-bit x, "
                             f"and x's device ({x.device}); got {a.dtype}/{b.dtype} on {a.device}/{b.device}")
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise ValueError(f"lora[{key!r}]: scaling must be a number, got {s!r}")
        factors += [a, b]
        scaling.append(float(s))
    be = resolve_backend(backend, x.device, x.dtype)
    tensors = [x] + [t for t in factors if t is not None]
    grad_needed = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    seed, offset = 0, 0
    if lora_dropout:
        from .ops.attention import draw_dropout_seed

        seed, offset = draw_dropout_seed()
    with torch.autocast(x.device.type, enabled=False):
        y = ffn_lora_forward(x, w1, b1, w2, b2, w_up, b_up, *factors, scaling, activation,
                             save if grad_needed else 0, float(lora_dropout), seed, offset, chunk_tokens,
                             backend=be)[0]
    if dropout_p:
        from .ops.dropout import replayed_dropout

        y = replayed_dropout(y, dropout_p, be)
    return y
