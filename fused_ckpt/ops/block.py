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
backward, so FSDP's unsharded parameters are the ones used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..backend import resolve_backend
from ..functional import fused_ffn
from ..functional_attention import fused_attention_block
from .ffn import ffn_backward
from .norm import layer_norm, layer_norm_apply_stats, rms_norm, rms_norm_apply_stats

# Flat parameter order of the Function's inputs (None where a module has no such tensor).
PARAM_NAMES = ("norm1_w", "norm1_b", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo",
               "norm2_w", "norm2_b", "w1", "b1", "w2", "b2")


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


def _norm_from_stats(spec: BlockSpec, x: Tensor, w, b, stats):
    if spec.norm == "rmsnorm":
        return rms_norm_apply_stats(x, w, stats[0], spec.backend)
    return layer_norm_apply_stats(x, w, b, stats[0], stats[1], spec.backend)


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
                              chunk_tokens=spec.chunk_tokens, backend=spec.backend)
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
        params = saved[3 + 2 * k:]
        needs = dict(zip(PARAM_NAMES, ctx.needs_input_grad[4:]))
        need_x = ctx.needs_input_grad[1]

        # 1. rebuild the attention half as a local graph (attention keeps q, k, v, o: no
        #    second recompute inside this backward)
        leaves = {n: (t.detach().requires_grad_(needs[n]) if t is not None else None)
                  for n, t in zip(PARAM_NAMES, params)}
        dev, ac_on, ac_dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(dev, dtype=ac_dtype, enabled=ac_on):
            xg = x.detach().requires_grad_(need_x)
            n1 = _norm_from_stats(spec, xg, leaves["norm1_w"], leaves["norm1_b"], stats1)
            h = xg + _attention(spec, n1, leaves, position_ids, mask, False)
            n2 = _norm_from_stats(spec, h, leaves["norm2_w"], leaves["norm2_b"], stats2)

        # 2. the FFN's own backward: Z recomputed inside the fused kernel, no FFN forward
        ffn_names = ("w1", "b1", "w2", "b2")
        ffn_needs = [True] + [needs[n] for n in ffn_names]
        #    (under autocast the forward ran the FFN on n2's dtype: weights and dy cast to it,
        #    weight gradients cast back, as the autocast casts' own backward would)
        be = resolve_backend(spec.backend, x.device)
        ct = n2.dtype
        cast = lambda t: None if t is None else t.detach().to(ct)  # noqa: E731
        g_n2, dw1, db1, dw2, db2 = ffn_backward(dy.to(ct), n2.detach(), None, None, cast(leaves["w1"]),
                                                cast(leaves["b1"]), cast(leaves["w2"]), spec.activation,
                                                ffn_needs, spec.chunk_tokens, be)
        ffn_grads = {n: (g.to(p.dtype) if g is not None and p is not None else g)
                     for n, g, p in zip(ffn_names, (dw1, db1, dw2, db2),
                                        (leaves[n] for n in ffn_names))}

        # 3. everything upstream of the FFN: dL/dh = dy (residual) + norm2's share of dL/dn2
        wanted = [("x", xg)] if need_x else []
        wanted += [(n, leaves[n]) for n in PARAM_NAMES if n not in ffn_names and needs[n]]
        grads = torch.autograd.grad([h, n2], [t for _, t in wanted], grad_outputs=[dy, g_n2],
                                    allow_unused=True) if wanted else ()
        got = dict(zip([n for n, _ in wanted], grads))
        out = [got.get(n) if n not in ffn_names else (ffn_grads[n] if needs[n] else None)
               for n in PARAM_NAMES]
        return (None, got.get("x"), None, None, *out)
