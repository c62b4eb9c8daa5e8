"""A whole pre-norm transformer block recomputed from its input: the "full" recompute contract.

    h = x + attn(norm1(x))
    y = h + ffn(norm2(h))

==========  =========================================  =====================================
recompute   saved for backward (besides parameters)    recomputed in backward
==========  =========================================  =====================================
"full"      x, the per-row statistics of both norms    norm1 (from x and its statistics, no
            (rstd; and mean for LayerNorm), and the    reduction), q/k/v, attention output,
            position ids / key-padding mask when       o_proj, h, norm2; then the FFN's own
            given                                      backward (its hidden layer recomputed
                                                       inside the fused kernel)
==========  =========================================  =====================================

The backward stops early: the FFN's forward is not re-run (its backward op recomputes
Z = norm2(h) W1^T in registers), so the block costs one forward of the attention half plus the
FFN's up-projection GEMM on top of eager -- the same GEMM work as non-reentrant
``torch.utils.checkpoint`` of the block, with fused kernels throughout. The parameters are
inputs of the autograd Function (saved as themselves), never read from the modules in
backward, so FSDP's unsharded parameters are the ones used. The backward is an explicit chain
of the ops' own backward functions (FFN, norm2, attention block, norm1), with no autograd graph
inside it, so ``torch.compile(fullgraph=True)`` traces the block; under autocast it redoes the
forward's casts and casts each gradient back, as the casts' own backward would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..backend import resolve_backend
from ..functional import fused_ffn
from ..functional_attention import (_autocast, _autocast_off, _check_positions, _check_scale,
                                    fused_attention_block)
from .attention import attn_block_backward, attn_block_forward
from .ffn import ffn_backward
from .norm import _prepare as _prepare_norm
from .norm import (layer_norm, layer_norm_apply, layer_norm_backward, rms_norm, rms_norm_apply,
                   rms_norm_backward)

# Flat parameter order of the Function's inputs (None where a module has no such tensor).
PARAM_NAMES = ("norm1_w", "norm1_b", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo",
               "norm2_w", "norm2_b", "w1", "b1", "w2", "b2", "w1u", "b1u")
# w1u / b1u: a separate up-projection weight and bias (w1 / b1 then hold the gate's), None when
# w1 is one packed [2f, d] weight or the FFN is ungated


def full_saved_bytes(tokens: int, d_model: int, elem: int, layer_norm: bool) -> int:
    """Bytes the "full" contract keeps (position ids and masks aside): x (elem each) and each
    norm's fp32 per-row statistics (rstd; and mean for LayerNorm)."""
    stats = 2 if layer_norm else 1
    return tokens * d_model * elem + 2 * stats * tokens * 4


@dataclass(frozen=True)
class BlockSpec:
    norm: str  # "rmsnorm" | "layernorm"
    eps: float
    n_heads: int
    n_kv_heads: int
    causal: bool
    scale: Optional[float]
    rope_theta: Optional[float]
    activation: str
    chunk_tokens: int
    backend: str


def _norm(spec: BlockSpec, x: Tensor, w, b):
    """Forward norm returning (y, statistics tuple)."""
    if spec.norm == "rmsnorm":
        y, rstd = rms_norm(x, w, spec.eps, spec.backend, return_stats=True)
        return y, (rstd,)
    y, mean, rstd = layer_norm(x, w, b, spec.eps, spec.backend, return_stats=True)
    return y, (mean, rstd)


def _attention(spec: BlockSpec, n1: Tensor, p: dict, position_ids, mask, recompute):
    return fused_attention_block(
        n1, p["wq"], p["bq"], p["wk"], p["bk"], p["wv"], p["bv"], p["wo"], p["bo"], spec.n_heads,
        spec.n_kv_heads, causal=spec.causal, scale=spec.scale, rope_theta=spec.rope_theta,
        position_ids=position_ids, key_padding_mask=mask, recompute=recompute, backend=spec.backend)


class BlockFullRecompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec: BlockSpec, x, position_ids, mask, *params):
        p = dict(zip(PARAM_NAMES, params))
        with torch.no_grad():
            n1, stats1 = _norm(spec, x, p["norm1_w"], p["norm1_b"])
            h = x + _attention(spec, n1, p, position_ids, mask, "all")
            del n1
            n2, stats2 = _norm(spec, h, p["norm2_w"], p["norm2_b"])
            y = h + fused_ffn(n2, p["w1"], p["b1"], p["w2"], p["b2"], spec.activation,
                              chunk_tokens=spec.chunk_tokens, backend=spec.backend, w_up=p["w1u"], b_up=p["b1u"])
        ctx.spec = spec
        ctx.n_stats = len(stats1)
        dev = x.device.type  # the backward recomputes under the same autocast state, as checkpoint does
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.save_for_backward(x, position_ids, mask, *stats1, *stats2, *params)
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise RuntimeError("FusedCheckpointedBlock(recompute='full') does not support double backward")
        spec: BlockSpec = ctx.spec
        saved = ctx.saved_tensors
        x, position_ids, mask = saved[:3]
        k = ctx.n_stats
        stats1, stats2 = saved[3:3 + k], saved[3 + k:3 + 2 * k]
        p = dict(zip(PARAM_NAMES, saved[3 + 2 * k:]))
        needs = dict(zip(PARAM_NAMES, ctx.needs_input_grad[4:]))
        need_x = ctx.needs_input_grad[1]
        dev, ac_on, ac_dtype = ctx.autocast
        # Explicit chain of the ops' own backward functions (no autograd graph: traceable by
        # torch.compile). Under autocast the forward ran every op on autocast-cast inputs; the
        # same casts are redone here and each gradient is cast back to its tensor's dtype, as
        # the casts' own backward would.
        with torch.autocast(dev, dtype=ac_dtype, enabled=ac_on):
            xc, n1w, n1b, be_n = _prepare_norm(x, p["norm1_w"], p["norm1_b"], spec.backend)
            wq, bq, wk, bk, wv, bv, wo, bo = _autocast(p["wq"], p["bq"], p["wk"], p["bk"], p["wv"], p["bv"],
                                                       p["wo"], p["bo"], device_type=dev)
        be_a = resolve_backend(spec.backend, x.device, wq.dtype)  # the dtype the forward's attention ran in
        B, S = x.shape[0], x.shape[1]
        pos = _check_positions(position_ids, B, S, x.device) if position_ids is not None else None
        scale = _check_scale(spec.scale, p["wq"].shape[0] // spec.n_heads)
        attn_args = (position_ids if pos is None else pos, mask, spec.n_heads, spec.n_kv_heads, spec.causal, scale,
                     spec.rope_theta)
        with _autocast_off(dev):
            # 1. recompute: norm1 from its statistics, the attention half (keeping q, k, v, o), norm2
            n1 = _norm_apply(spec, xc, n1w, n1b, stats1, be_n)
            y_a, o, lse, q, k_, v = attn_block_forward(n1, wq, bq, wk, bk, wv, bv, wo, bo, *attn_args, "none", be_a)
            h = x + y_a
        with torch.autocast(dev, dtype=ac_dtype, enabled=ac_on):
            hc, n2w, n2b, _ = _prepare_norm(h, p["norm2_w"], p["norm2_b"], spec.backend)
        with _autocast_off(dev):
            n2 = _norm_apply(spec, hc, n2w, n2b, stats2, be_n)
            # 2. the FFN's own backward: Z recomputed inside the fused kernel, no FFN forward
            ct = n2.dtype
            cast = lambda t: None if t is None else t.to(ct)  # noqa: E731
            ffn_names = ("w1", "b1", "w2", "b2", "w1u", "b1u")  # the op's gradient order
            ffn_needs = [True] + [needs[n] for n in ffn_names]
            be = resolve_backend(spec.backend, x.device, ct)
            g_n2, *ffn_grads = ffn_backward(dy.to(ct), n2, None, None, cast(p["w1"]), cast(p["b1"]), cast(p["w2"]),
                                            spec.activation, ffn_needs, spec.chunk_tokens, be, cast(p["w1u"]),
                                            cast(p["b1u"]))
            grads = dict(zip(ffn_names, ffn_grads))
            # 3. norm2, then dL/dh = dy (residual) + norm2's share
            dh_n, grads["norm2_w"], grads["norm2_b"] = _norm_grad(spec, g_n2, hc, n2w, stats2, needs["norm2_w"],
                                                                  needs["norm2_b"], be_n)
            dh = dy + dh_n.to(h.dtype)
            # 4. the attention half, then norm1; dL/dx = dh (residual) + norm1's share
            attn_names = ("wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo")
            up = need_x or needs["norm1_w"] or needs["norm1_b"]
            attn_needs = [up] + [needs[n] for n in attn_names]
            d_n1, *attn_grads = attn_block_backward(dh.to(y_a.dtype), n1, wq, bq, wk, bk, wv, bv, wo, q, k_, v, o, lse,
                                                    *attn_args, attn_needs, be_a)
            grads.update(zip(attn_names, attn_grads))
            dx = None
            if up:
                dx_n, grads["norm1_w"], grads["norm1_b"] = _norm_grad(spec, d_n1, xc, n1w, stats1, needs["norm1_w"],
                                                                      needs["norm1_b"], be_n)
                dx = dh + dx_n.to(x.dtype) if need_x else None
        out = [grads[n].to(p[n].dtype) if needs[n] else None for n in PARAM_NAMES]
        return (None, dx, None, None, *out)


def _norm_apply(spec: BlockSpec, x, w, b, stats, backend):
    if spec.norm == "rmsnorm":
        return rms_norm_apply(x, w, stats[0], backend)
    return layer_norm_apply(x, w, b, stats[0], stats[1], backend)


def _norm_grad(spec: BlockSpec, dy, x, w, stats, need_w: bool, need_b: bool, backend):
    """(dx, dw, db) of a norm from its statistics (dw / db None where not needed)."""
    if spec.norm == "rmsnorm":
        dx, dw = rms_norm_backward(dy, x, w, stats[0], [True, need_w], backend)
        return dx, (dw if need_w else None), None
    dx, dw, db = layer_norm_backward(dy, x, w, stats[0], stats[1], [True, need_w, need_b], backend)
    return dx, (dw if need_w else None), (db if need_b else None)
