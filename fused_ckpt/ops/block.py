"""A whole transformer block recomputed from its input: the "full" recompute contract.

Norm placements (``BlockSpec.placement``; N1..N4 are the block's norms, absent ones skipped)::

    "pre"       h = x + attn(N1(x));          y = h + ffn(N2(h))          Llama, GPT-2, GPT-NeoX (sequential)
    "sandwich"  h = x + N3(attn(N1(x)));      y = h + N4(ffn(N2(h)))      Gemma2, Gemma3
    "post"      h = x + N3(attn(x));          y = h + N4(ffn(h))          OLMo2
    "parallel"  y = x + attn(N1(x)) + ffn(N2(x))                          GPT-NeoX use_parallel_residual

All norms of a block are of one kind (``norm``: RMSNorm, with ``norm_offset=1.0`` Gemma's
``(1 + w)``, or LayerNorm with or without bias) and one epsilon.

==========  =========================================  =====================================
recompute   saved for backward (besides parameters)    recomputed in backward
==========  =========================================  =====================================
"full"      x, and the fp32 per-row statistics of      every norm (from its input and its
            each norm (rstd; and mean for LayerNorm):  statistics, no reduction), q/k/v, the
            N1 and N2 ("pre"), N1..N4 ("sandwich"),    attention output, o_proj, h; the FFN's
            N3 and N4 ("post"), N1 once ("parallel":   output only when N4 needs it as its
            N2 normalises the same x with the same     input ("sandwich", "post"); then the
            eps, so its statistics are N1's); the      FFN's own backward (its hidden layer
            position ids / key-padding mask when given recomputed inside the fused kernel)
==========  =========================================  =====================================

PEFT LoRA (vanilla LoRA on a frozen base, ``BlockSpec.lora``): the factors A [r, in], B [out, r] of
the projections that have an adapter (q -- the packed qkv weight for a packed layout --, k, v, o;
fc1 -- gate, or the packed / ungated fc1 --, up, fc2) are the Function's inputs after the
parameters (:data:`LORA_NAMES`); the attention half runs :mod:`fused_ckpt.ops.attn_lora`, the FFN
:mod:`fused_ckpt.ops.ffn_lora`; every base parameter (norms included) must be frozen, as PEFT
sets them (no base gradient is computed), and autocast is refused. Besides the above, "full"
then keeps the FFN adapters' ``[tokens, r]`` products t = drop(input) A^T (in the factors' dtype)
when there is no N4 (with N4 the FFN forward is re-run in backward and gives them again); the
attention adapters' products are recomputed with the attention half (its forward is re-run in
backward anyway: 2 T r (in + out) FLOPs per adapter). LoRA dropout (one p for the layer) is
replayed from a (seed, offset) per half drawn in the forward (:func:`draw_seeds`), the masks
those of the two ops at offsets +0.. per projection.

(:func:`full_saved_bytes` counts these bytes.) Without N4 the backward stops early: the FFN's
forward is not re-run (its backward op recomputes Z = N2(h) W1^T in registers), so the block
costs one forward of the attention half plus the FFN's up-projection GEMM on top of eager --
the same GEMM work as non-reentrant ``torch.utils.checkpoint`` of the block, with fused kernels
throughout. With N4 ("sandwich", "post") the FFN's output is N4's input, so the FFN forward is
re-run too (what checkpointing the block also does). The parameters are inputs of the autograd
Function (saved as themselves), never read from the modules in backward, so FSDP's unsharded
parameters are the ones used. The backward is an explicit chain of the ops' own backward
functions (N4, FFN, N2, N3, attention block, N1), with no autograd graph inside it, so
``torch.compile(fullgraph=True)`` traces the block; under autocast it redoes the forward's casts
and casts each gradient back, as the casts' own backward would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..backend import resolve_backend
from ..functional import fused_ffn
from ..functional_attention import _autocast, _autocast_off, _check_block, _check_positions, _check_scale
from .attention import attn_block_backward, attn_block_forward, draw_dropout_seed
from .dropout import dropout_replay
from .ffn import ffn_backward
from .norm import _prepare as _prepare_norm
from .norm import (layer_norm, layer_norm_apply, layer_norm_apply_stats, layer_norm_backward, rms_norm,
                   rms_norm_apply, rms_norm_apply_stats, rms_norm_backward)

# Flat parameter order of the Function's inputs (None where a module has no such tensor).
# norm1: before the attention, norm2: before the FFN, norm3: after the attention (sandwich /
# post), norm4: after the FFN (sandwich / post); q_norm_w / k_norm_w: the attention's QK-norm.
PARAM_NAMES = ("norm1_w", "norm1_b", "wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo",
               "norm2_w", "norm2_b", "w1", "b1", "w2", "b2", "w1u", "b1u",
               "norm3_w", "norm3_b", "norm4_w", "norm4_b", "q_norm_w", "k_norm_w")
# w1u / b1u: a separate up-projection weight and bias (w1 / b1 then hold the gate's), None when
# w1 is one packed [2f, d] weight or the FFN is ungated. wk/bk/wv/bv are None when wq holds a
# packed qkv weight (BlockSpec.qkv_layout "packed" or "neox").

# PEFT LoRA adapters (vanilla LoRA on a frozen base): the Function's inputs after PARAM_NAMES,
# ``<role>_a`` = A [r, in], ``<role>_b`` = B [out, r] (None where the projection has no adapter).
# Roles: the attention's q (the packed qkv weight for a packed layout), k, v, o; the FFN's fc1
# (gate, or the packed / ungated fc1), up (a separate up weight), fc2.
LORA_ATTN_ROLES = ("q", "k", "v", "o")
LORA_FFN_ROLES = ("fc1", "up", "fc2")
LORA_ROLES = LORA_ATTN_ROLES + LORA_FFN_ROLES
LORA_NAMES = tuple(f"{r}_{f}" for r in LORA_ROLES for f in ("a", "b"))

PLACEMENTS = ("pre", "sandwich", "post", "parallel")
# which norms each placement has (1: before attention, 2: before FFN, 3: after attention, 4: after FFN)
PLACEMENT_NORMS = {"pre": (1, 2), "sandwich": (1, 2, 3, 4), "post": (3, 4), "parallel": (1, 2)}


def saved_norm_stats(placement: str) -> int:
    """How many norms' per-row statistics the "full" contract keeps for ``placement``
    ("parallel": N1's, which N2 shares)."""
    if placement not in PLACEMENT_NORMS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    return 1 if placement == "parallel" else len(PLACEMENT_NORMS[placement])


def full_saved_bytes(tokens: int, d_model: int, elem: int, layer_norm: bool, placement: str = "pre",
                     ffn_lora_ranks: tuple = (), lora_elem: int = 0) -> int:
    """Bytes the "full" contract keeps (position ids and masks aside): x (elem each) and the
    fp32 per-row statistics (rstd; and mean for LayerNorm) of the norms
    :func:`saved_norm_stats` counts; with PEFT LoRA on the FFN (``ffn_lora_ranks``: the ranks of
    its adapters, ``lora_elem``: the factors' element size) also the ``[tokens, r]`` products
    t = drop(input) A^T of those adapters, unless the placement has a norm after the FFN (its
    forward is re-run in backward and gives them again)."""
    stats = 2 if layer_norm else 1
    kept = 0 if placement not in PLACEMENT_NORMS or 4 in PLACEMENT_NORMS[placement] else sum(ffn_lora_ranks)
    return tokens * d_model * elem + saved_norm_stats(placement) * stats * tokens * 4 + tokens * kept * lora_elem


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
    placement: str = "pre"  # see PLACEMENTS
    norm_offset: float = 0.0  # 1.0: Gemma's (1 + w) RMSNorm
    # the attention's options (fused_attention_block's keywords)
    qk_norm_eps: float = 1e-6
    qk_norm_offset: float = 0.0
    rotary_dim: Optional[int] = None
    qkv_layout: str = "separate"
    softcap: Optional[float] = None  # attention logit soft-capping (Gemma2)
    window: Optional[int] = None  # sliding window: key j visible from query i iff i - window < j <= i
    # replayed dropouts (training only; a (seed, offset) per call saved as ints, masks regenerated in
    # backward): on the attention probabilities, on the attention branch's output (GPT-2 resid_dropout,
    # GPT-NeoX post_attention_dropout, Phi-3 resid_attn_dropout) and on the FFN branch's output
    dropout_p: float = 0.0
    out_dropout_p: float = 0.0
    ffn_dropout_p: float = 0.0
    # PEFT LoRA (vanilla, frozen base): ((role, scaling), ...) of the projections with an adapter
    # (roles of LORA_ROLES; the factors are the Function's inputs after PARAM_NAMES) and the one
    # lora_dropout p of them all (training only; masks replayed from a seed per half)
    lora: tuple = ()
    lora_dropout_p: float = 0.0

    def has(self, i: int) -> bool:
        return i in PLACEMENT_NORMS[self.placement]

    def lora_scaling(self, role: str) -> float:
        """The scaling of ``role``'s adapter (0.0 when it has none)."""
        return dict(self.lora).get(role, 0.0)

    def lora_on(self, roles: tuple) -> bool:
        """Whether any of ``roles`` has an adapter."""
        return any(r in roles for r, _ in self.lora)


def _norm(spec: BlockSpec, x: Tensor, w, b):
    """Forward norm returning (y, statistics tuple)."""
    if spec.norm == "rmsnorm":
        y, rstd = rms_norm(x, w, spec.eps, spec.backend, return_stats=True, offset=spec.norm_offset)
        return y, (rstd,)
    y, mean, rstd = layer_norm(x, w, b, spec.eps, spec.backend, return_stats=True)
    return y, (mean, rstd)


def _norm_apply_fwd(spec: BlockSpec, x: Tensor, w, b, stats):
    """Forward norm from statistics computed earlier (N2 of the parallel layout)."""
    if spec.norm == "rmsnorm":
        return rms_norm_apply_stats(x, w, stats[0], spec.backend, offset=spec.norm_offset)
    return layer_norm_apply_stats(x, w, b, stats[0], stats[1], spec.backend)


# the order the seeds are drawn in (the per-module path's order: the attention's LoRA and dropouts,
# then the FFN's LoRA and output dropout); "attn_lora" / "ffn_lora": LoRA dropout of each half
_DROPOUTS = ("attn_lora", "dropout_p", "out_dropout_p", "ffn_lora", "ffn_dropout_p")


def _dropout_active(spec: BlockSpec, name: str) -> bool:
    if name == "attn_lora":
        return bool(spec.lora_dropout_p) and spec.lora_on(LORA_ATTN_ROLES)
    if name == "ffn_lora":
        return bool(spec.lora_dropout_p) and spec.lora_on(LORA_FFN_ROLES)
    return bool(getattr(spec, name))


def draw_seeds(spec: BlockSpec) -> dict:
    """``{dropout name: (seed, offset)}`` for the block's active dropouts, drawn from torch's default
    generator in the order of ``_DROPOUTS``."""
    return {k: draw_dropout_seed() for k in _DROPOUTS if _dropout_active(spec, k)}


def _attn_setup(spec: BlockSpec, x: Tensor, p: dict, position_ids, mask, seeds: dict) -> tuple:
    """The attention op's inputs: x and the attention tensors cast as autocast casts them (the
    caller's autocast state), the backend, the positional arguments after the weights and the
    feature keywords (QK-norm, partial rotary, packed layout, softcap, window, dropout seed)."""
    dev = x.device.type
    x, wq, bq, wk, bk, wv, bv, wo, bo, qn, kn = _autocast(
        x, p["wq"], p["bq"], p["wk"], p["bk"], p["wv"], p["bv"], p["wo"], p["bo"], p["q_norm_w"], p["k_norm_w"],
        device_type=dev)
    be = resolve_backend(spec.backend, x.device, wq.dtype)
    B, S = x.shape[0], x.shape[1]
    pos = _check_positions(position_ids, B, S, x.device) if position_ids is not None else None
    scale = _check_scale(spec.scale, p["wo"].shape[1] // spec.n_heads)
    args = (pos, mask, spec.n_heads, spec.n_kv_heads, spec.causal, scale, spec.rope_theta)
    opts = dict(q_norm=qn, k_norm=kn, qk_norm_eps=spec.qk_norm_eps, qk_norm_offset=spec.qk_norm_offset,
                rotary_dim=spec.rotary_dim, qkv_layout=spec.qkv_layout)
    if spec.softcap is not None or spec.window is not None or spec.dropout_p:  # else the schema without them
        seed, off = seeds.get("dropout_p", (0, 0))
        opts.update(softcap=spec.softcap, window=spec.window, dropout_p=spec.dropout_p, seed=seed, rng_offset=off)
    return x, (wq, bq, wk, bk, wv, bv, wo, bo), be, args, opts


def _dropout(spec: BlockSpec, t: Tensor, name: str, seeds: dict, backend: str) -> Tensor:
    """The replayed dropout ``name`` on t (forward), or on a gradient (its own backward: the same
    mask and scale); t itself when that dropout is off."""
    p = getattr(spec, name)
    if not p:
        return t
    seed, off = seeds[name]
    return dropout_replay(t, float(p), seed, off, backend)


def _lora_factors(p: dict, roles: tuple) -> tuple:
    """([A per role], [B per role]) of ``roles`` (None where a projection has no adapter)."""
    return [p.get(f"{r}_a") for r in roles], [p.get(f"{r}_b") for r in roles]


def _attn_lora_kw(spec: BlockSpec, seeds: dict) -> dict:
    seed, off = seeds.get("attn_lora", (0, 0))
    return dict(lora_dropout_p=float(spec.lora_dropout_p), lora_seed=seed, lora_offset=off)


def _attn_forward(spec: BlockSpec, xc: Tensor, w: tuple, p: dict, be: str, args: tuple, opts: dict, seeds: dict,
                  mode: str) -> tuple:
    """The attention op on the prepared inputs: ``(y, o, lse, q, k, v, t)`` with t the LoRA
    products ``(t_q, t_k, t_v, t_o)`` (None without attention adapters: the plain op)."""
    if not spec.lora_on(LORA_ATTN_ROLES):
        return (*attn_block_forward(xc, *w, *args, mode, be, **opts), None)
    from .attn_lora import attn_lora_forward

    a, b = _lora_factors(p, LORA_ATTN_ROLES)
    out = attn_lora_forward(xc, *w, *a, *b, [spec.lora_scaling(r) for r in LORA_ATTN_ROLES], *args, mode, be, **opts,
                            **_attn_lora_kw(spec, seeds))
    return (*out[:6], tuple(t if f is not None else None for t, f in zip(out[6:10], a)))


def _attention(spec: BlockSpec, a_in: Tensor, p: dict, position_ids, mask, seeds: dict) -> Tensor:
    """The attention branch's output (before any norm after it), with its output dropout."""
    xc, w, be, args, opts = _attn_setup(spec, a_in, p, position_ids, mask, seeds)
    _check_block(xc, *w, spec.n_heads, spec.n_kv_heads, be, spec.qkv_layout)
    with _autocast_off(a_in.device.type):
        y = _attn_forward(spec, xc, w, p, be, args, opts, seeds, "all")[0]
        return _dropout(spec, y, "out_dropout_p", seeds, be)


def _ffn(spec: BlockSpec, n2: Tensor, p: dict, seeds: Optional[dict] = None, kept: Optional[dict] = None) -> Tensor:
    """The FFN branch's output (before its dropout). With LoRA on the FFN: the LoRA FFN op
    (:mod:`fused_ckpt.ops.ffn_lora`, z not kept), its ``[tokens, r]`` products put in
    ``kept["ffn_t"]`` (t1, tu, t2; None for a projection without adapter)."""
    if not spec.lora_on(LORA_FFN_ROLES):
        return fused_ffn(n2, p["w1"], p["b1"], p["w2"], p["b2"], spec.activation, chunk_tokens=spec.chunk_tokens,
                         backend=spec.backend, w_up=p["w1u"], b_up=p["b1u"])
    from .ffn_lora import ffn_lora_forward

    a, b = _lora_factors(p, LORA_FFN_ROLES)
    seed, off = (seeds or {}).get("ffn_lora", (0, 0))
    y, *ts, _ = ffn_lora_forward(n2, p["w1"], p["b1"], p["w2"], p["b2"], p["w1u"], p["b1u"], a[0], b[0], a[1], b[1],
                                 a[2], b[2], [spec.lora_scaling(r) for r in LORA_FFN_ROLES], spec.activation, 0,
                                 float(spec.lora_dropout_p), seed, off, spec.chunk_tokens)
    if kept is not None:
        kept["ffn_t"] = tuple(t if f is not None else None for t, f in zip(ts, a))
    return y


def block_forward_math(spec: BlockSpec, x: Tensor, p: dict, position_ids, mask, seeds: dict,
                       kept: Optional[dict] = None):
    """``(y, {norm index: statistics})``: the block's forward for ``spec.placement`` (the
    statistics of every norm applied), the dropouts with ``seeds`` (:func:`draw_seeds`); ``p``
    maps PARAM_NAMES (and LORA_NAMES, with ``spec.lora``) to tensors. With LoRA on the FFN its
    ``[tokens, r]`` products go into ``kept`` (:func:`_ffn`)."""
    stats = {}
    a_in = x
    if spec.has(1):
        a_in, stats[1] = _norm(spec, x, p["norm1_w"], p["norm1_b"])
    a = _attention(spec, a_in, p, position_ids, mask, seeds)
    del a_in
    if spec.has(3):
        a, stats[3] = _norm(spec, a, p["norm3_w"], p["norm3_b"])
    if spec.placement == "parallel":  # N2 normalises x, as N1 does: N1's statistics
        f = _ffn(spec, _norm_apply_fwd(spec, x, p["norm2_w"], p["norm2_b"], stats[1]), p, seeds, kept)
        f = _dropout(spec, f, "ffn_dropout_p", seeds, resolve_backend(spec.backend, f.device, f.dtype))
        return (f + a) + x, stats  # Hugging Face GPT-NeoX's order: mlp + attn + x
    h = x + a
    del a
    f_in = h
    if spec.has(2):
        f_in, stats[2] = _norm(spec, h, p["norm2_w"], p["norm2_b"])
    f = _ffn(spec, f_in, p, seeds, kept)
    del f_in
    f = _dropout(spec, f, "ffn_dropout_p", seeds, resolve_backend(spec.backend, f.device, f.dtype))
    if spec.has(4):
        f, stats[4] = _norm(spec, f, p["norm4_w"], p["norm4_b"])
    return h + f, stats


def _check_lora(spec: BlockSpec, x: Tensor, params: tuple, lora: tuple) -> None:
    """The LoRA inputs of the Function agree with ``spec.lora``; the base is frozen; no autocast."""
    if len(lora) != len(LORA_NAMES):
        raise ValueError(f"FusedCheckpointedBlock with LoRA: expected {len(LORA_NAMES)} LoRA tensors "
                         f"({', '.join(LORA_NAMES)}), got {len(lora)}")
    roles = dict(spec.lora)
    for i, role in enumerate(LORA_ROLES):
        a, b = lora[2 * i], lora[2 * i + 1]
        if (a is None) != (b is None) or (a is None) == (role in roles):
            raise ValueError(f"FusedCheckpointedBlock with LoRA: role {role!r} must have both factors exactly when "
                             f"spec.lora names it (spec.lora: {spec.lora})")
    trainable = [n for n, t in zip(PARAM_NAMES, params) if t is not None and t.requires_grad]
    if trainable:
        raise ValueError("FusedCheckpointedBlock with LoRA: the base parameters must be frozen (requires_grad=False, "
                         f"as PEFT sets them; the whole-layer LoRA path computes no base gradient); trainable: "
                         f"{trainable}")
    if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
        raise ValueError("FusedCheckpointedBlock with LoRA: not under autocast (the LoRA ops take x's dtype and "
                         "fp32 adapters as PEFT keeps them)")


class BlockFullRecompute(torch.autograd.Function):
    """``apply(spec, x, position_ids, mask, *params, *lora)``: params in PARAM_NAMES order; with
    ``spec.lora``, the 14 LoRA factors in LORA_NAMES order follow (None where a projection has no
    adapter). Saved: x, position ids / mask, the norms' statistics and, with LoRA on the FFN and
    no norm after it, the FFN adapters' ``[tokens, r]`` products (the attention adapters'
    products come back with the attention forward the backward re-runs anyway); parameters and
    LoRA factors as themselves."""

    @staticmethod
    def forward(ctx, spec: BlockSpec, x, position_ids, mask, *tensors):
        n = len(PARAM_NAMES)
        params, lora = tensors[:n], tensors[n:]
        p = dict(zip(PARAM_NAMES, params))
        if spec.lora:
            _check_lora(spec, x, params, lora)
            p.update(zip(LORA_NAMES, lora))
        elif lora:
            raise ValueError("FusedCheckpointedBlock: LoRA tensors given but spec.lora is empty")
        with torch.no_grad():
            seeds = draw_seeds(spec)  # ints kept on ctx: the masks are regenerated in backward
            kept = {}
            y, stats = block_forward_math(spec, x, p, position_ids, mask, seeds, kept)
        # the FFN adapters' [tokens, r] products: kept unless N4 makes the backward re-run the FFN forward
        ffn_t = kept.get("ffn_t", ()) if not spec.has(4) else ()
        ctx.spec, ctx.seeds = spec, seeds
        ctx.stat_keys = [(i, len(stats[i])) for i in sorted(stats)]
        ctx.n_ffn_t = len(ffn_t)
        dev = x.device.type  # the backward recomputes under the same autocast state, as checkpoint does
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.save_for_backward(x, position_ids, mask, *[t for i in sorted(stats) for t in stats[i]], *ffn_t, *tensors)
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            raise RuntimeError("FusedCheckpointedBlock(recompute='full') does not support double backward")
        spec: BlockSpec = ctx.spec
        saved = ctx.saved_tensors
        x, position_ids, mask = saved[:3]
        stats, at = {}, 3
        for i, n in ctx.stat_keys:
            stats[i], at = saved[at:at + n], at + n
        if spec.placement == "parallel":
            stats[2] = stats[1]
        ffn_t, at = saved[at:at + ctx.n_ffn_t], at + ctx.n_ffn_t
        n_p = len(PARAM_NAMES)
        p = dict(zip(PARAM_NAMES, saved[at:at + n_p]))
        p.update(zip(LORA_NAMES, saved[at + n_p:]))
        needs = dict(zip(PARAM_NAMES, ctx.needs_input_grad[4:4 + n_p]))
        lora_needs = dict(zip(LORA_NAMES, ctx.needs_input_grad[4 + n_p:]))
        need_x = ctx.needs_input_grad[1]
        lora_ffn = spec.lora_on(LORA_FFN_ROLES)
        dev, ac_on, ac_dtype = ctx.autocast
        autocast = lambda: torch.autocast(dev, dtype=ac_dtype, enabled=ac_on)  # noqa: E731
        grads = {}
        # Explicit chain of the ops' own backward functions (no autograd graph: traceable by
        # torch.compile). Under autocast the forward ran every op on autocast-cast inputs; the
        # same casts are redone here and each gradient is cast back to its tensor's dtype, as
        # the casts' own backward would.
        seeds = ctx.seeds
        with autocast():
            xc, n1w, n1b, be_n = _prepare_norm(x, p["norm1_w"], p["norm1_b"], spec.backend)
            _, attn_w, be_a, attn_args, attn_opts = _attn_setup(
                spec, x, p, position_ids, mask, seeds)  # the dtype the forward's attention ran in
        # 1. recompute: N1 from its statistics, the attention half (keeping q, k, v, o and, with
        #    LoRA on it, the adapters' [tokens, r] products), N3, h, N2
        with _autocast_off(dev):
            n1 = _norm_apply(spec, xc, n1w, n1b, stats[1], be_n) if spec.has(1) else xc
            y_a, o, lse, q, k_, v, attn_t = _attn_forward(spec, n1, attn_w, p, be_a, attn_args, attn_opts, seeds,
                                                          "none")
            y_a = _dropout(spec, y_a, "out_dropout_p", seeds, be_a)  # the branch's output (mask regenerated)
        a, n3 = y_a, None
        if spec.has(3):
            with autocast():
                y_ac, n3w, n3b, _ = _prepare_norm(y_a, p["norm3_w"], p["norm3_b"], spec.backend)
            with _autocast_off(dev):
                a = _norm_apply(spec, y_ac, n3w, n3b, stats[3], be_n)
            n3 = (y_ac, n3w)
        with _autocast_off(dev):
            h = x if spec.placement == "parallel" else x + a
        with autocast():
            hc, n2w, n2b, _ = _prepare_norm(h, p["norm2_w"], p["norm2_b"], spec.backend)
        with _autocast_off(dev):
            n2 = _norm_apply(spec, hc, n2w, n2b, stats[2], be_n) if spec.has(2) else hc
        # 2. N4's backward, on the FFN's output recomputed with the forward's casts
        g_f = dy
        if spec.has(4):
            kept = {}
            with torch.no_grad(), autocast():
                f = _ffn(spec, n2, p, seeds, kept)
                f = _dropout(spec, f, "ffn_dropout_p", seeds, resolve_backend(spec.backend, f.device, f.dtype))
                fc, n4w, n4b, _ = _prepare_norm(f, p["norm4_w"], p["norm4_b"], spec.backend)
            with _autocast_off(dev):
                g_f, grads["norm4_w"], grads["norm4_b"] = _norm_grad(spec, dy.to(fc.dtype), fc, n4w, stats[4],
                                                                    needs["norm4_w"], needs["norm4_b"], be_n)
            del f, fc
            ffn_t = kept.get("ffn_t", ())
        attn_names = ("wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "q_norm_w", "k_norm_w")
        attn_lora = [f"{r}_{f}" for r in LORA_ATTN_ROLES for f in ("a", "b")]
        up = need_x or needs["norm1_w"] or needs["norm1_b"]
        # what the attention half's backward has to produce (besides dx)
        need_attn = any(needs[n] for n in attn_names + ("norm3_w", "norm3_b")) or \
            any(lora_needs.get(n, False) for n in attn_lora)
        if spec.placement == "parallel":  # the FFN branch's dx only reaches x (and N2's weights)
            need_ffn_x = need_x or needs["norm2_w"] or needs["norm2_b"]
            need_attn_half = need_ffn_x or up or need_attn
        else:  # it also reaches everything before h
            need_ffn_x = up or need_attn or needs["norm2_w"] or needs["norm2_b"]
            need_attn_half = need_ffn_x
        with _autocast_off(dev):
            # 3. the FFN's own backward: Z recomputed inside the fused kernel, no FFN forward
            ct = n2.dtype
            cast = lambda t: None if t is None else t.to(ct)  # noqa: E731
            ffn_names = ("w1", "b1", "w2", "b2", "w1u", "b1u")  # the op's gradient order
            be = resolve_backend(spec.backend, x.device, ct)
            g_f = _dropout(spec, g_f.to(ct), "ffn_dropout_p", seeds, be)  # dropout's backward: the same mask
            if lora_ffn:  # frozen base: the adapters' gradients and dx (ops/ffn_lora.py)
                from .ffn_lora import ffn_lora_backward

                la, lb = _lora_factors(p, LORA_FFN_ROLES)
                seed, off = seeds.get("ffn_lora", (0, 0))
                g_n2, *lora_grads = ffn_lora_backward(
                    g_f, n2, None, p["w1"], p["b1"], p["w2"], p["w1u"], p["b1u"], la[0], lb[0], la[1], lb[1], la[2],
                    lb[2], *ffn_t, [spec.lora_scaling(r) for r in LORA_FFN_ROLES], spec.activation, bool(need_ffn_x),
                    float(spec.lora_dropout_p), seed, off, spec.chunk_tokens)
                grads.update(zip([f"{r}_{f}" for r in LORA_FFN_ROLES for f in ("a", "b")], lora_grads))
            else:
                ffn_needs = [True] + [needs[n] for n in ffn_names]
                g_n2, *ffn_grads = ffn_backward(g_f, n2, None, None, cast(p["w1"]), cast(p["b1"]), cast(p["w2"]),
                                                spec.activation, ffn_needs, spec.chunk_tokens, be, cast(p["w1u"]),
                                                cast(p["b1u"]))
                grads.update(zip(ffn_names, ffn_grads))
                need_ffn_x = need_attn_half = True
        dx = None
        if need_attn_half:
            g_n2 = g_n2 if need_ffn_x else None  # (parallel: the FFN branch's dx only when x needs it)
            dx = _backward_attention_half(spec, dy, x, g_n2, hc, n2w, stats, n3, y_a, n1, xc, n1w, attn_w, q, k_, v, o,
                                          lse, attn_t, p, attn_args, attn_opts, be_a, be_n, seeds, needs, lora_needs,
                                          need_x, up, grads, dev)
        del n2
        out = [grads[n].to(p[n].dtype) if needs[n] and grads.get(n) is not None else None for n in PARAM_NAMES]
        if spec.lora:
            out += [grads[n].to(p[n].dtype) if lora_needs[n] and grads.get(n) is not None else None
                    for n in LORA_NAMES]
        return (None, dx, None, None, *out)


def _backward_attention_half(spec, dy, x, g_n2, hc, n2w, stats, n3, y_a, n1, xc, n1w, attn_w, q, k_, v, o, lse,
                             attn_t, p, attn_args, attn_opts, be_a, be_n, seeds, needs, lora_needs, need_x, up, grads,
                             dev):
    """Steps 4 and 5 of the backward chain (N2; N3, the attention half, N1): fills ``grads`` and
    returns dx (None when x needs none)."""
    with _autocast_off(dev):
        # 4. N2; then dL/dh = dy (residual) + the FFN branch's share (not for "parallel")
        if g_n2 is None:  # "parallel" without dx: the attention branch alone
            dh_n = None
        elif spec.has(2):
            dh_n, grads["norm2_w"], grads["norm2_b"] = _norm_grad(spec, g_n2, hc, n2w, stats[2],
                                                                  needs["norm2_w"], needs["norm2_b"], be_n)
        else:
            dh_n = g_n2
        if spec.placement == "parallel":
            dx_f, dh = dh_n, dy  # the FFN branch's share of dL/dx; the attention branch sees dy
        else:
            dh = dy + dh_n.to(x.dtype)
        # 5. N3, the attention half, then N1; dL/dx = dh (residual) + the attention branch's share
        g_a = dh
        if n3 is not None:
            g_a, grads["norm3_w"], grads["norm3_b"] = _norm_grad(spec, dh.to(n3[0].dtype), n3[0], n3[1], stats[3],
                                                                needs["norm3_w"], needs["norm3_b"], be_n)
        g_a = _dropout(spec, g_a.to(y_a.dtype), "out_dropout_p", seeds, be_a)
        wq, bq, wk, bk, wv, bv, wo, _ = attn_w
        if spec.lora_on(LORA_ATTN_ROLES):  # frozen base: the adapters' gradients and dx
            from .attn_lora import attn_lora_backward

            names = [f"{r}_{f}" for r in LORA_ATTN_ROLES for f in ("a", "b")]
            la, lb = _lora_factors(p, LORA_ATTN_ROLES)
            d_n1, *lora_grads = attn_lora_backward(
                g_a, n1, wq, bq, wk, bk, wv, bv, wo, q, k_, v, o, lse, *attn_t, *la, *lb,
                [spec.lora_scaling(r) for r in LORA_ATTN_ROLES], *attn_args, [up] + [lora_needs[n] for n in names],
                be_a, **attn_opts, **_attn_lora_kw(spec, seeds))
            grads.update(zip(names, lora_grads))
        else:
            attn_names = ("wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "q_norm_w", "k_norm_w")
            attn_needs = [up] + [needs[n] for n in attn_names]
            d_n1, *attn_grads = attn_block_backward(g_a, n1, wq, bq, wk, bk, wv, bv, wo, q, k_, v, o,
                                                    lse, *attn_args, attn_needs, be_a, **attn_opts)
            grads.update(zip(attn_names, attn_grads))
        dx = None
        if up:
            if spec.has(1):
                dx_n, grads["norm1_w"], grads["norm1_b"] = _norm_grad(spec, d_n1, xc, n1w, stats[1],
                                                                      needs["norm1_w"], needs["norm1_b"], be_n)
            else:
                dx_n = d_n1
            if need_x:
                dx = dh + dx_n.to(x.dtype)
                if spec.placement == "parallel":
                    dx = dx + dx_f.to(x.dtype)
    return dx

def _norm_apply(spec: BlockSpec, x, w, b, stats, backend):
    if spec.norm == "rmsnorm":
        return rms_norm_apply(x, w, stats[0], backend, spec.norm_offset)
    return layer_norm_apply(x, w, b, stats[0], stats[1], backend)


def _norm_grad(spec: BlockSpec, dy, x, w, stats, need_w: bool, need_b: bool, backend):
    """(dx, dw, db) of a norm from its statistics (dw / db None where not needed)."""
    if spec.norm == "rmsnorm":
        dx, dw = rms_norm_backward(dy, x, w, stats[0], [True, need_w], backend, spec.norm_offset)
        return dx, (dw if need_w else None), None
    dx, dw, db = layer_norm_backward(dy, x, w, stats[0], stats[1], [True, need_w, need_b], backend)
    return dx, (dw if need_w else None), (db if need_b else None)
