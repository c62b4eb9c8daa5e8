"""``FusedCheckpointedAttention``: a self-attention block whose backward recomputes q, k, v."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from ..functional_attention import _check_head_dim, fused_attention_block, recompute_mode


class FusedCheckpointedAttention(nn.Module):
    """``o_proj(attention(rope(q_proj x), rope(k_proj x), v_proj x))`` as one fused op.

    =========  ========================================  ====================================
    recompute  kept for backward (besides parameters)    recomputed in backward
    =========  ========================================  ====================================
    "all"      x, lse                                    q, k, v (projection + rotary),
                                                         attention output (forward kernel)
    "qkv"      x, attention output, lse                  q, k, v (projection + rotary)
    False      x, q, k, v, attention output, lse         nothing but the probabilities
    =========  ========================================  ====================================

    (plus ``position_ids`` / ``key_padding_mask`` when passed). ``True`` means "all". lse is
    fp32 ``[batch, n_heads, seqlen]``; the attention output has x's dtype and
    ``[batch, seqlen, n_heads * head_dim]``.

    Parameters are ``nn.Linear`` modules ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, so
    a Hugging Face ``LlamaAttention`` state dict loads as is. ``head_dim`` defaults to
    ``d_model // n_heads``; ``scale`` to ``1/sqrt(head_dim)``. ``rope_theta``: rotary embedding
    with the Llama ``rotate_half`` convention (default rope only); None: no rotary embedding.

    ``forward(x, position_ids=None, key_padding_mask=None)``: x ``(batch, seqlen, d_model)``;
    position_ids int ``(seqlen,)``/``(batch, seqlen)`` (default 0..seqlen-1);
    key_padding_mask bool ``(batch, seqlen)``, True = attend to this key (note: the opposite
    of ``nn.MultiheadAttention``'s ``key_padding_mask``).

    Equivalent PyTorch::

        q = rope(q_proj(x).view(B, S, n_heads, D))
        k = rope(k_proj(x).view(B, S, n_kv_heads, D))
        v = v_proj(x).view(B, S, n_kv_heads, D)
        y = o_proj(flash_attention(q, k, v, causal, scale, key_padding_mask).flatten(2))
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None, causal: bool = True,
                 bias: bool = False, rope_theta: Optional[float] = None, recompute: Union[str, bool] = "qkv",
                 device=None, dtype=None, *, head_dim: Optional[int] = None, scale: Optional[float] = None,
                 backend: str = "auto"):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        for name, val in (("d_model", d_model), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads)):
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads} (grouped-query attention)")
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}; pass head_dim")
            head_dim = d_model // n_heads
        _check_head_dim(head_dim)
        recompute_mode(recompute)
        if rope_theta is not None and (isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float))
                                       or not rope_theta > 0):
            raise ValueError(f"rope_theta must be a positive number or None, got {rope_theta!r}")
        if rope_theta is not None and head_dim % 2:
            raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not math.isfinite(scale)):
            raise ValueError(f"scale must be a finite number or None, got {scale!r}")
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.causal = bool(causal)
        self.rope_theta = None if rope_theta is None else float(rope_theta)
        self.recompute = recompute
        self.scale = scale
        self.backend = backend
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias, **kw)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias, **kw)

    def forward(self, x: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return fused_attention_block(
            x, self.q_proj.weight, self.q_proj.bias, self.k_proj.weight, self.k_proj.bias,
            self.v_proj.weight, self.v_proj.bias, self.o_proj.weight, self.o_proj.bias,
            self.n_heads, self.n_kv_heads, causal=self.causal, scale=self.scale, rope_theta=self.rope_theta,
            position_ids=position_ids, key_padding_mask=key_padding_mask, recompute=self.recompute,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, causal={self.causal}, rope_theta={self.rope_theta}, "
                f"recompute={self.recompute!r}")

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_module(cls, attn: nn.Module, recompute: Union[str, bool] = "qkv", causal: Optional[bool] = None,
                    *, share_parameters: bool = False, **kwargs) -> "FusedCheckpointedAttention":
        """Build a fused block with ``attn``'s weights (same device and dtype).

        ``share_parameters=True`` (Hugging Face attention only): the new module holds ``attn``'s
        own submodules (``q_proj``, ... and any others) under their own names, so parameters,
        state-dict keys and module names are ``attn``'s; otherwise the weights are copied.

        Accepted:
          * Hugging Face Llama-style attention (``q_proj``/``k_proj``/``v_proj``/``o_proj``
            Linears and a ``config`` with ``num_attention_heads``, ``num_key_value_heads``,
            the rotary base in ``rope_theta`` (transformers 4.x) or ``rope_parameters``
            (5.x); default rope only). Causal unless ``causal=False``.
          * ``nn.MultiheadAttention(batch_first=True)`` with equal q/k/v widths, no
            ``add_bias_kv``/``add_zero_attn`` and no active dropout; it becomes self-attention
            (forward takes x only). Non-causal unless ``causal=True``.
        """
        if isinstance(attn, nn.MultiheadAttention):
            if share_parameters:
                raise ValueError("from_module(share_parameters=True): nn.MultiheadAttention packs q, k and v in "
                                 "one in_proj_weight, which has no q_proj/k_proj/v_proj layout to share")
            return _from_mha(cls, attn, recompute, bool(causal) if causal is not None else False, **kwargs)
        if all(isinstance(getattr(attn, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                and getattr(attn, "config", None) is not None:
            return _from_hf(cls, attn, recompute, causal, share_parameters, **kwargs)
        raise ValueError(
            f"from_module: cannot convert {type(attn).__name__}; supported: Hugging Face Llama-style attention "
            "(q_proj/k_proj/v_proj/o_proj + config) and nn.MultiheadAttention(batch_first=True)"
        )


def _copy(dst: nn.Linear, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    with torch.no_grad():
        dst.weight.copy_(weight)
        if bias is None:
            dst.register_parameter("bias", None)
        else:
            if dst.bias is None:
                dst.bias = nn.Parameter(torch.empty_like(bias))
            dst.bias.copy_(bias)


def _hf_rope_theta(config) -> Optional[float]:
    """The rotary base of a Llama-style config, transformers 4.x or 5.x; errors for any rope
    other than the default one (linear/dynamic/yarn/llama3 scaling, partial rotary)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        if "rope_theta" not in params and not any(k in params for k in ("rope_type", "type")):
            raise ValueError(f"from_module: per-layer-type rope parameters {sorted(params)} are not supported")
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    else:
        scaling = getattr(config, "rope_scaling", None)
        rope_type = "default" if not scaling else scaling.get("rope_type", scaling.get("type", "default"))
        theta = getattr(config, "rope_theta", None)
    if rope_type != "default":
        raise ValueError(f"from_module: rope type {rope_type!r} is not supported (only the default rotary embedding)")
    prf = getattr(config, "partial_rotary_factor", 1.0)
    if prf not in (None, 1.0):
        raise ValueError(f"from_module: partial_rotary_factor={prf} is not supported")
    if theta is None:
        raise ValueError("from_module: the config has no rope_theta")
    return float(theta)


def _from_hf(cls, attn, recompute, causal, share_parameters=False, **kwargs):
    cfg = attn.config
    for extra in ("q_norm", "k_norm"):
        if getattr(attn, extra, None) is not None:
            raise ValueError(f"from_module: {type(attn).__name__} has {extra} (QK-norm), which is not supported")
    if getattr(attn, "sliding_window", None) or getattr(cfg, "use_sliding_window", False):
        raise ValueError("from_module: sliding-window attention is not supported")
    if getattr(cfg, "attention_dropout", 0.0):
        raise ValueError(f"from_module: attention_dropout={cfg.attention_dropout} is not supported (set it to 0)")
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    d_model = attn.q_proj.in_features
    if attn.q_proj.out_features != n_heads * head_dim or attn.k_proj.out_features != n_kv * head_dim:
        raise ValueError(f"from_module: projection sizes q {attn.q_proj.out_features}, k {attn.k_proj.out_features} "
                         f"do not match n_heads={n_heads}, n_kv_heads={n_kv}, head_dim={head_dim}")
    scale = getattr(attn, "scaling", None)
    if causal is None:
        causal = bool(getattr(attn, "is_causal", True))
    w = attn.q_proj.weight
    if share_parameters and (attn._parameters or attn._buffers):
        raise ValueError(f"from_module(share_parameters=True): {type(attn).__name__} holds parameters or buffers "
                         "of its own; only its submodules can be shared")
    new = cls(d_model, n_heads, n_kv, causal=causal, bias=attn.q_proj.bias is not None,
              rope_theta=_hf_rope_theta(cfg), recompute=recompute, device="meta" if share_parameters else w.device,
              dtype=w.dtype, head_dim=head_dim, scale=None if scale is None else float(scale), **kwargs)
    if share_parameters:  # the source's own modules (the meta placeholders are dropped)
        for name, child in attn.named_children():
            new.add_module(name, child)
        new.train(attn.training)
        return new
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        src = getattr(attn, name)
        _copy(getattr(new, name), src.weight, src.bias)
    new.train(attn.training)
    return new


def _from_mha(cls, mha: nn.MultiheadAttention, recompute, causal, **kwargs):
    if not mha.batch_first:
        raise ValueError("from_module: nn.MultiheadAttention must use batch_first=True")
    if not mha._qkv_same_embed_dim:
        raise ValueError("from_module: nn.MultiheadAttention with kdim/vdim != embed_dim is not supported")
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("from_module: nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
    if mha.dropout and mha.training:
        raise ValueError(f"from_module: nn.MultiheadAttention dropout={mha.dropout} is not supported in training "
                         "(set dropout=0 or call .eval())")
    E, H = mha.embed_dim, mha.num_heads
    has_in_bias = mha.in_proj_bias is not None
    has_out_bias = mha.out_proj.bias is not None
    w = mha.in_proj_weight
    new = cls(E, H, H, causal=causal, bias=has_in_bias, rope_theta=None, recompute=recompute,
              device=w.device, dtype=w.dtype, **kwargs)
    wq, wk, wv = w.chunk(3, 0)
    bq, bk, bv = mha.in_proj_bias.chunk(3, 0) if has_in_bias else (None, None, None)
    _copy(new.q_proj, wq, bq)
    _copy(new.k_proj, wk, bk)
    _copy(new.v_proj, wv, bv)
    _copy(new.o_proj, mha.out_proj.weight, mha.out_proj.bias if has_out_bias else None)
    new.train(mha.training)
    return new
