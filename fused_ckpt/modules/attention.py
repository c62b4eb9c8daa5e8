"""``FusedCheckpointedAttention``: a self-attention block whose backward recomputes q, k, v."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from ..functional_attention import _check_head_dim, _check_rotary_dim, fused_attention_block, recompute_mode
from ._swap import record_children, swapped_child, swapped_lora, warn_unfused


# Hugging Face attention projection layouts, by the submodule names that hold them:
# (q/k/v names or the one packed name, output name, qkv_layout of the op, rotary embedding
# from the config?). Conv1D modules (GPT-2) are recognised by type and read transposed.
HF_PROJECTIONS = (
    (("q_proj", "k_proj", "v_proj"), "o_proj", "separate", True),  # Llama, Mistral, Qwen2/3, Gemma 1-3, OLMo2
    (("qkv_proj",), "o_proj", "packed", True),                      # Phi-3: rows [q; k; v]
    (("c_attn",), "c_proj", "packed", False),                       # GPT-2: Conv1D [d, 3d], columns [q | k | v]
    (("query_key_value",), "dense", "neox", True),                  # GPT-NeoX: rows interleaved per head
)


def _is_conv1d(m) -> bool:  # transformers.pytorch_utils.Conv1D, matched by structure
    return (type(m).__name__ == "Conv1D" and isinstance(getattr(m, "weight", None), torch.Tensor)
            and getattr(m, "nf", None) == m.weight.shape[1])


def _is_projection(m) -> bool:
    return isinstance(m, nn.Linear) or _is_conv1d(m)


def hf_projection_layout(attn: nn.Module) -> Optional[tuple]:
    """The row of :data:`HF_PROJECTIONS` whose modules ``attn`` has (as nn.Linear or Conv1D),
    or None."""
    for row in HF_PROJECTIONS:
        if all(_is_projection(getattr(attn, n, None)) for n in row[0] + (row[1],)):
            return row
    return None


class _QKNorm(nn.Module):
    """The RMSNorm weight of a fused attention's QK-norm (``y = x * rsqrt(mean(x^2) + eps) *
    (offset + w)``, in fp32). The fused op reads ``weight``; ``forward`` is the same math in
    plain PyTorch, for use outside the op."""

    def __init__(self, dim: int, eps: float, offset: float, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset, device=device, dtype=dtype))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
                * (self.weight.float() + self.offset)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, offset={self.offset}"


class FusedCheckpointedAttention(nn.Module):
    """``o_proj(attention(rope(q_norm(q_proj x)), rope(k_norm(k_proj x)), v_proj x))`` as one fused op.

    =========  ========================================  ====================================
    recompute  kept for backward (besides parameters)    recomputed in backward
    =========  ========================================  ====================================
    "all"      x, lse                                    q, k, v (projection, QK-norm,
                                                         rotary), attention output (forward
                                                         kernel)
    "qkv"      x, attention output, lse                  q, k, v (projection, QK-norm, rotary)
    False      x, q, k, v, attention output, lse         QK-norm and rotary when there is a
                                                         QK-norm (q, k kept before it); then
                                                         only the probabilities
    =========  ========================================  ====================================

    (plus ``position_ids`` / ``key_padding_mask`` when passed). ``True`` means "all". lse is
    fp32 ``[batch, n_heads, seqlen]``; the attention output has x's dtype and
    ``[batch, seqlen, n_heads * head_dim]``.

    Parameters are ``nn.Linear`` modules ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, so
    a Hugging Face ``LlamaAttention`` state dict loads as is; with ``qkv_layout="packed"`` one
    ``qkv_proj`` (rows [q; k; v], Phi-3's layout) replaces the first three. ``head_dim``
    defaults to ``d_model // n_heads``; ``scale`` to ``1/sqrt(head_dim)``. ``rope_theta``:
    rotary embedding with the Llama ``rotate_half`` convention (default rope only), over the
    first ``rotary_dim`` dims of each head (None: all); None: no rotary embedding.
    ``qk_norm``: "head" (RMSNorm over each head's ``head_dim``, Qwen3/Gemma3) or "projection"
    (over the whole q / k projection, OLMo2) -- modules ``q_norm``/``k_norm`` holding the
    weights, ``qk_norm_eps``, ``qk_norm_offset`` 1.0 for Gemma's ``(1 + w)``.

    Packed projections in the op: the packed weight goes in as one tensor (``qkv_layout``
    "packed" rows [q; k; v], or "neox" rows interleaved per head as GPT-NeoX's
    ``query_key_value``); q, k and v are split from one GEMM's output and their gradients
    joined back into one packed gradient, so it lands on the packed Parameter (one GEMM each
    for dW and dx). A Conv1D weight (GPT-2, ``[in, out]``) is passed as ``weight.t()``, a
    view: nothing is copied and the gradient comes back in the Conv1D layout.

    PEFT LoRA: projections wrapped by PEFT's ``lora.Linear`` after construction
    (``get_peft_model``) are computed in the fused op (:mod:`fused_ckpt.ops.attn_lora`: the base
    GEMM plus ``scaling * (drop(in) A^T) B^T``, dropout masks replayed, each adapter's
    ``[tokens, r]`` product kept besides the table's tensors) when they are vanilla LoRA on frozen
    base weights and QK-norms with one dropout p, outside autocast; merged or disabled adapters
    run the plain op. Anything else (DoRA, a LoRA bias, a quantized base, a trainable base, ...)
    runs the exact unfused path, warning once with the reason.

    ``forward(x, position_ids=None, key_padding_mask=None)``: x ``(batch, seqlen, d_model)``;
    position_ids int ``(seqlen,)``/``(batch, seqlen)`` (default 0..seqlen-1);
    key_padding_mask bool ``(batch, seqlen)``, True = attend to this key (note: the opposite
    of ``nn.MultiheadAttention``'s ``key_padding_mask``).

    Equivalent PyTorch::

        q = rope(q_norm(q_proj(x).view(B, S, n_heads, D)))     # q_norm over the flat projection
        k = rope(k_norm(k_proj(x).view(B, S, n_kv_heads, D)))  # for qk_norm="projection"
        v = v_proj(x).view(B, S, n_kv_heads, D)
        y = o_proj(flash_attention(q, k, v, causal, scale, key_padding_mask).flatten(2))
    """

    # submodule names of the projections (the op's inputs are read from them at each call)
    _qkv_names: tuple = ("q_proj", "k_proj", "v_proj")
    _out_name: str = "o_proj"
    # attention options of the op, read at each call (and by the whole-layer block): logit
    # soft-capping, sliding window, dropout on the probabilities and on the output (the dropouts
    # in training mode only). Off here; a subclass (the Hugging Face adoption) reads them from
    # the module it adopts.
    softcap: Optional[float] = None
    window: Optional[int] = None
    dropout_p: float = 0.0
    out_dropout_p: float = 0.0

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None, causal: bool = True,
                 bias: bool = False, rope_theta: Optional[float] = None, recompute: Union[str, bool] = "qkv",
                 device=None, dtype=None, *, head_dim: Optional[int] = None, scale: Optional[float] = None,
                 backend: str = "auto", qk_norm: Optional[str] = None, qk_norm_eps: float = 1e-6,
                 qk_norm_offset: float = 0.0, rotary_dim: Optional[int] = None, qkv_layout: str = "separate"):
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
        if qk_norm not in (None, "head", "projection"):
            raise ValueError(f"qk_norm must be None, 'head' or 'projection', got {qk_norm!r}")
        if qkv_layout not in ("separate", "packed"):
            raise ValueError(f"qkv_layout must be 'separate' or 'packed' (q_proj/k_proj/v_proj or one qkv_proj), "
                             f"got {qkv_layout!r}")
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.causal = bool(causal)
        self.rope_theta = None if rope_theta is None else float(rope_theta)
        self.rotary_dim = _check_rotary_dim(rotary_dim, head_dim, rope_theta)
        self.recompute = recompute
        self.scale = scale
        self.backend = backend
        self.qk_norm_eps, self.qk_norm_offset = float(qk_norm_eps), float(qk_norm_offset)
        self.qkv_layout = qkv_layout
        kw = dict(device=device, dtype=dtype)
        if qkv_layout == "packed":
            self._qkv_names = ("qkv_proj",)
            self.qkv_proj = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * head_dim, bias=bias, **kw)
        else:
            self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias, **kw)
            self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias, **kw)
            self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias, **kw)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias, **kw)
        if qk_norm is not None:
            per_head = qk_norm == "head"
            self.q_norm = _QKNorm(head_dim if per_head else n_heads * head_dim, self.qk_norm_eps,
                                  self.qk_norm_offset, **kw)
            self.k_norm = _QKNorm(head_dim if per_head else n_kv_heads * head_dim, self.qk_norm_eps,
                                  self.qk_norm_offset, **kw)
        self._record_children()

    def _record_children(self) -> None:
        """Forward-time guard (modules/_swap.py): the submodules the fused op reads weights from."""
        record_children(self, self._qkv_names + (self._out_name, "q_norm", "k_norm"))

    def _block_inputs(self) -> tuple:
        """``(tensors, options)``: the op's tensors read where they live (keys wq, bq, wk, bk,
        wv, bv, wo, bo, q_norm_w, k_norm_w; a packed layout has its weight in wq and None in
        wk..bv; Conv1D weights as transposed views) and its feature keywords (qk_norm_eps,
        qk_norm_offset, rotary_dim, qkv_layout). Read at each call (FSDP-safe), from the modules the fused op was built
        from (a PEFT LoRA wrapper put around one since: its base layer, whose type says whether
        the weight is a Conv1D's)."""
        m = self._modules
        rec = self.__dict__.get("_fused_children") or {}

        def proj(name):
            mod = rec.get(name, m[name])
            return (mod.weight.t() if _is_conv1d(mod) else mod.weight), mod.bias

        t = dict.fromkeys(("wq", "bq", "wk", "bk", "wv", "bv"))
        if self.qkv_layout == "separate":
            (t["wq"], t["bq"]), (t["wk"], t["bk"]), (t["wv"], t["bv"]) = (proj(n) for n in self._qkv_names)
        else:
            t["wq"], t["bq"] = proj(self._qkv_names[0])
        t["wo"], t["bo"] = proj(self._out_name)
        qn, kn = m.get("q_norm"), m.get("k_norm")
        t["q_norm_w"] = qn.weight if qn is not None else None
        t["k_norm_w"] = kn.weight if kn is not None else None
        opts = dict(qk_norm_eps=self.qk_norm_eps, qk_norm_offset=self.qk_norm_offset, rotary_dim=self.rotary_dim,
                    qkv_layout=self.qkv_layout)
        return t, opts

    def forward(self, x: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        lora = {}
        why = swapped_child(self)
        if why is not None:  # e.g. a PEFT LoRA wrapper around a projection: its weight alone is not the math
            found, why_not = self._peft_lora(x)
            if found is None:
                warn_unfused(self, why_not or why)
                return self._unfused_forward(x, position_ids, key_padding_mask)
            if found["lora"]:  # else merged / disabled adapters: the base weights alone are the math
                lora = found
        t, opts = self._block_inputs()
        return fused_attention_block(
            x, t["wq"], t["bq"], t["wk"], t["bk"], t["wv"], t["bv"], t["wo"], t["bo"],
            self.n_heads, self.n_kv_heads, causal=self.causal, scale=self.scale, rope_theta=self.rope_theta,
            position_ids=position_ids, key_padding_mask=key_padding_mask, recompute=self.recompute,
            backend=self.backend, q_norm=t["q_norm_w"], k_norm=t["k_norm_w"], **opts, **self._options(), **lora,
        )

    def _peft_lora(self, x: torch.Tensor) -> tuple:
        """``({"lora": {key: (A, B, scaling)}, "lora_dropout": p}, None)`` -- the keywords of
        :func:`fused_attention_block`, keys "q", "k", "v" (or "qkv" for a packed layout) and "o" --
        when every replaced child is a PEFT ``lora.Linear`` around the projection this module was
        built from, computing vanilla LoRA (or its base alone: merged or disabled adapters, then
        ``lora`` is empty) on frozen base weights and QK-norms, with one LoRA dropout p (0 in eval
        mode: PEFT's dropout modules follow ``train()``/``eval()``), outside autocast; else
        ``(None, reason)`` and the unfused path runs."""
        packed = self.qkv_layout != "separate"
        roles = dict(zip(self._qkv_names, ("qkv",) if packed else ("q", "k", "v")))
        roles[self._out_name] = "o"
        got, why = swapped_lora(self, roles, x, "the projections and QK-norms")
        if got is None:
            return None, why
        lora, p = got
        return {"lora": lora, "lora_dropout": p or 0.0}, None

    def _options(self) -> dict:
        """The attention options for the op: softcap and window always, the dropouts in training
        mode only; options that are off are left out (the op's schema without them)."""
        out = {}
        if self.softcap:
            out["softcap"] = self.softcap
        if self.window:
            out["window"] = self.window
        if self.training:
            for k in ("dropout_p", "out_dropout_p"):
                if getattr(self, k):
                    out[k] = getattr(self, k)
        return out

    def _unfused_forward(self, x: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                         key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The same attention in plain PyTorch through the current submodules (called, not
        read: a PEFT LoRA wrapper adds its low-rank terms), for a module whose projections were
        replaced after construction. Probabilities in fp32 (fp64 for fp64 inputs); query rows
        that see no key give zero, as the fused kernels do."""
        from ..ops.attention import _aten_rope, lse_dtype, rope_tables

        for feat in ("softcap", "window", "dropout_p", "out_dropout_p"):  # attributes the block reads
            if getattr(self, feat, None):
                raise NotImplementedError(f"fused_ckpt: the unfused path of {type(self).__name__} does not apply "
                                          f"{feat}={getattr(self, feat)!r}")
        B, S, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        m = self._modules
        if self.qkv_layout == "separate":
            q, k, v = (m[n](x) for n in self._qkv_names)
        else:
            z = m[self._qkv_names[0]](x)
            if self.qkv_layout == "neox":
                q, k, v = (t.reshape(B, S, H * D) for t in z.view(B, S, H, 3, D).unbind(3))
            else:
                q, k, v = z.split([H * D, Hkv * D, Hkv * D], -1)
        q, k, v = q.view(B, S, H, D), k.view(B, S, Hkv, D), v.view(B, S, Hkv, D)
        for name in ("q_norm", "k_norm"):
            norm = m.get(name)
            if norm is not None:
                t = q if name == "q_norm" else k
                t = norm(t) if norm.weight.shape[0] == D else norm(t.flatten(2)).view(t.shape)
                q, k = (t, k) if name == "q_norm" else (q, t)
        if self.rope_theta is not None:
            pos = position_ids if position_ids is None or position_ids.dim() == 2 else position_ids[None]
            cos, sin = rope_tables(pos, S, self.rotary_dim or D, self.rope_theta, x.device)
            q, k = _aten_rope(q, cos, sin, False), _aten_rope(k, cos, sin, False)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        acc = lse_dtype(x.dtype)
        scale = self.scale if self.scale is not None else D ** -0.5
        scores = torch.matmul(q, k.transpose(-1, -2)).to(acc) * scale
        keep = torch.ones(S, S, dtype=torch.bool, device=x.device)
        if self.causal:
            keep = keep.tril()
        keep = keep[None, None]
        if key_padding_mask is not None:
            keep = keep & key_padding_mask[:, None, None, :].bool()
        p = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0).to(x.dtype)
        o = torch.matmul(p, v).transpose(1, 2).reshape(B, S, H * D)
        return m[self._out_name](o)

    def extra_repr(self) -> str:
        extra = ""
        if self.rotary_dim is not None:
            extra += f", rotary_dim={self.rotary_dim}"
        if self.qkv_layout != "separate":
            extra += f", qkv_layout={self.qkv_layout!r}"
        if "q_norm" in self._modules:
            extra += f", qk_norm_eps={self.qk_norm_eps}, qk_norm_offset={self.qk_norm_offset}"
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, causal={self.causal}, rope_theta={self.rope_theta}, "
                f"recompute={self.recompute!r}" + extra)

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_module(cls, attn: nn.Module, recompute: Union[str, bool] = "qkv", causal: Optional[bool] = None,
                    *, share_parameters: bool = False, **kwargs) -> "FusedCheckpointedAttention":
        """Build a fused block with ``attn``'s weights (same device and dtype).

        ``share_parameters=True`` (Hugging Face attention only): the new module holds ``attn``'s
        own submodules (``q_proj``, ... and any others) under their own names, so parameters,
        state-dict keys and module names are ``attn``'s; otherwise the weights are copied.

        Accepted:
          * Hugging Face attention with a ``config`` (``num_attention_heads``,
            ``num_key_value_heads``; the rotary base and partial factor in ``rope_theta`` /
            ``partial_rotary_factor`` (transformers 4.x) or ``rope_parameters`` (5.x, also per
            layer type, as Gemma 3); default rope only, or none for GPT-2) and one of the
            projection layouts of :data:`HF_PROJECTIONS`: ``q_proj/k_proj/v_proj/o_proj``,
            Phi-3 ``qkv_proj``, GPT-2 ``c_attn``/``c_proj`` (Conv1D), GPT-NeoX
            ``query_key_value``/``dense`` (the last three only with ``share_parameters=True``).
            ``q_norm``/``k_norm`` RMSNorms (per head or over the projection, ``w`` or
            ``(1 + w)``: identified by evaluating them) become the QK-norm. Causal unless
            ``causal=False``. ``attn_logit_softcapping`` becomes ``softcap``, a sliding window
            ``window``, GPT-2's ``attn_dropout`` / ``resid_dropout`` p ``dropout_p`` /
            ``out_dropout_p`` (applied in training mode; the p at conversion).
          * ``nn.MultiheadAttention(batch_first=True)`` with equal q/k/v widths, no
            ``add_bias_kv``/``add_zero_attn`` and no active dropout; it becomes self-attention
            (forward takes x only). Non-causal unless ``causal=True``.
        """
        if isinstance(attn, nn.MultiheadAttention):
            if share_parameters:
                raise ValueError("from_module(share_parameters=True): nn.MultiheadAttention packs q, k and v in "
                                 "one in_proj_weight, which has no q_proj/k_proj/v_proj layout to share")
            return _from_mha(cls, attn, recompute, bool(causal) if causal is not None else False, **kwargs)
        if hf_projection_layout(attn) is not None and getattr(attn, "config", None) is not None:
            return _from_hf(cls, attn, recompute, causal, share_parameters, **kwargs)
        raise ValueError(
            f"from_module: cannot convert {type(attn).__name__}; supported: Hugging Face attention "
            "(q_proj/k_proj/v_proj/o_proj, qkv_proj, c_attn/c_proj or query_key_value/dense, + config) and "
            "nn.MultiheadAttention(batch_first=True)"
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


def _hf_rope_params(config, attn=None) -> Optional[tuple]:
    """(rope type, theta, partial rotary factor) of a Hugging Face config (transformers 4.x
    ``rope_theta``/``rope_scaling``/``partial_rotary_factor``/``rotary_pct``, 5.x
    ``rope_parameters``, also per layer type as Gemma 3's, where ``attn.layer_type`` picks the
    entry), or None when the config describes no rotary embedding at all."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        if "rope_theta" not in params and not any(k in params for k in ("rope_type", "type")):
            layer_type = getattr(attn, "layer_type", None)
            if layer_type not in params or not isinstance(params[layer_type], dict):
                raise ValueError(f"from_module: per-layer-type rope parameters {sorted(params)}, and the attention's "
                                 f"layer_type {layer_type!r} names none of them")
            params = params[layer_type]
        rope_type = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta", getattr(config, "rope_theta", None))
        factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    else:
        scaling = getattr(config, "rope_scaling", None)
        theta = getattr(config, "rope_theta", None)
        if theta is None and not scaling:
            return None
        rope_type = "default" if not scaling else scaling.get("rope_type", scaling.get("type", "default"))
        factor = getattr(config, "partial_rotary_factor", None)
        if factor is None:
            factor = getattr(config, "rotary_pct", None)
    return rope_type, theta, factor


def _hf_rotary(config, attn=None, head_dim: Optional[int] = None) -> tuple:
    """(rotary base, rotary_dim or None for the whole head) of a Hugging Face attention; errors
    for any rope other than the default one (linear/dynamic/yarn/llama3 scaling) and for a
    config without one."""
    found = _hf_rope_params(config, attn)
    if found is None:
        raise ValueError("from_module: the config has no rope_theta")
    rope_type, theta, factor = found
    if rope_type != "default":
        raise ValueError(f"from_module: rope type {rope_type!r} is not supported (only the default rotary embedding)")
    if theta is None:
        raise ValueError("from_module: the config has no rope_theta")
    rotary_dim = None
    if factor not in (None, 1, 1.0):
        if head_dim is None:
            raise ValueError(f"from_module: partial_rotary_factor={factor} needs the head dim")
        rotary_dim = int(head_dim * factor)  # Hugging Face's rule (int(), not round())
        if rotary_dim <= 0 or rotary_dim % 2:
            raise ValueError(f"from_module: partial_rotary_factor={factor} rotates {rotary_dim} of {head_dim} dims; "
                             "an even positive count is needed")
        if rotary_dim == head_dim:
            rotary_dim = None
    return float(theta), rotary_dim


def _hf_rope_theta(config) -> Optional[float]:
    """The rotary base of a Llama-style config, transformers 4.x or 5.x; errors for any rope
    other than the default full one (scaling types, partial rotary)."""
    theta, rotary_dim = _hf_rotary(config, None, 2 ** 20)
    if rotary_dim is not None:
        raise ValueError("from_module: a partial rotary embedding is not supported here")
    return theta


def _qk_norm_of(m: nn.Module, head_dim: int, heads: int, name: str) -> tuple:
    """(kind "head"/"projection", eps, offset) of a Hugging Face QK-norm module, identified by
    evaluating it in float64: an RMSNorm multiplying by ``w`` (Qwen3, OLMo2) or ``(1 + w)``
    (Gemma 3). Anything else raises."""
    import copy

    w = getattr(m, "weight", None)
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or not isinstance(eps, (int, float)) or \
            getattr(m, "bias", None) is not None:
        raise ValueError(f"from_module: {name} ({type(m).__name__}) is not an RMSNorm with a weight and an eps")
    if w.shape[0] not in (head_dim, heads * head_dim):
        raise ValueError(f"from_module: {name} normalises {w.shape[0]} values, neither a head ({head_dim}) nor the "
                         f"projection ({heads * head_dim})")
    kind = "head" if w.shape[0] == head_dim else "projection"
    if w.is_meta:
        raise ValueError(f"from_module: {name} has meta weights: its form cannot be checked by evaluation")
    probe = torch.randn(3, w.shape[0], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        ref = copy.deepcopy(m).to(device="cpu", dtype=torch.float64)
        try:
            got = ref(probe)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"from_module: {name} could not be evaluated ({type(e).__name__}: {e})") from None
        xhat = probe * torch.rsqrt(probe.square().mean(-1, keepdim=True) + eps)
        for offset in (0.0, 1.0):
            want = xhat * (ref.weight + offset)
            if got.shape == want.shape and torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6):  # HF: fp32 inside
                return kind, float(eps), offset
    raise ValueError(f"from_module: {name} ({type(m).__name__}) computes neither w * rmsnorm(x) nor (1 + w) * rmsnorm(x)")


def _hf_heads(attn, cfg) -> tuple:
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = (getattr(attn, "head_dim", None) or getattr(attn, "head_size", None) or getattr(cfg, "head_dim", None)
                or cfg.hidden_size // n_heads)
    return n_heads, n_kv, head_dim


def _packed_rows(w: torch.Tensor, layout: str, n_heads: int, head_dim: int) -> torch.Tensor:
    """A packed weight [rows, ...] or bias [rows] in the rows [q; k; v] order ("neox" rows are
    interleaved per head: regrouped)."""
    if layout != "neox":
        return w
    t = w.reshape(n_heads, 3, head_dim, *w.shape[1:])
    return t.transpose(0, 1).reshape(w.shape)


def _hf_options(attn) -> dict:
    """The attention options of a Hugging Face attention: its logit soft-capping (Gemma 2/3
    ``attn_logit_softcapping``), sliding window (its own ``sliding_window``, None on a full layer;
    else the config's, as Mistral reads it) and GPT-2's ``attn_dropout`` / ``resid_dropout`` p."""
    cap = getattr(attn, "attn_logit_softcapping", None)
    window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(attn.config, "sliding_window", None)
    drops = [getattr(attn, n, None) for n in ("attn_dropout", "resid_dropout")]
    drops = [float(d.p) if isinstance(d, nn.Dropout) else 0.0 for d in drops]
    return dict(softcap=float(cap) if cap else None, window=int(window) if window else None,
                dropout_p=drops[0], out_dropout_p=drops[1])


def _from_hf(cls, attn, recompute, causal, share_parameters=False, **kwargs):
    cfg = attn.config
    qkv_names, out_name, layout, rotary = hf_projection_layout(attn)
    if getattr(attn, "is_cross_attention", False):
        raise ValueError(f"from_module: {type(attn).__name__} is a cross-attention")
    if getattr(cfg, "attention_dropout", 0.0):
        raise ValueError(f"from_module: attention_dropout={cfg.attention_dropout} is not supported (set it to 0)")
    n_heads, n_kv, head_dim = _hf_heads(attn, cfg)
    mods = {n: getattr(attn, n) for n in qkv_names + (out_name,)}

    def shape(n):  # [out, in] whatever the module type
        w = mods[n].weight
        return tuple(w.shape[::-1]) if _is_conv1d(mods[n]) else tuple(w.shape)

    d_model = shape(qkv_names[0])[1]
    if layout == "neox" and n_kv != n_heads:
        raise ValueError(f"from_module: interleaved query_key_value with n_kv_heads={n_kv} != n_heads={n_heads}")
    want = ({"q_proj": n_heads * head_dim, "k_proj": n_kv * head_dim, "v_proj": n_kv * head_dim}
            if layout == "separate" else {qkv_names[0]: (n_heads + 2 * n_kv) * head_dim})
    for n, rows in want.items():
        if shape(n)[0] != rows or shape(n)[1] != d_model:
            raise ValueError(f"from_module: projection {n} has shape {shape(n)} (out, in), expected ({rows}, {d_model}) "
                             f"for n_heads={n_heads}, n_kv_heads={n_kv}, head_dim={head_dim}")
    if shape(out_name) != (d_model, n_heads * head_dim):
        raise ValueError(f"from_module: output projection {out_name} has shape {shape(out_name)} (out, in), expected "
                         f"({d_model}, {n_heads * head_dim})")
    theta, rotary_dim = _hf_rotary(cfg, attn, head_dim) if rotary else (None, None)
    own = getattr(attn, "rotary_ndims", None)  # GPT-NeoX states its rotated width itself
    if own is not None and rotary and own != (rotary_dim or head_dim):
        raise ValueError(f"from_module: the attention rotates {own} dims, the config says {rotary_dim or head_dim}")
    norms = {}
    for name, heads in (("q_norm", n_heads), ("k_norm", n_kv)):
        if getattr(attn, name, None) is not None:
            norms[name] = _qk_norm_of(getattr(attn, name), head_dim, heads, name)
    qk_kind, qk_eps, qk_offset = norms.get("q_norm", (None, 1e-6, 0.0))
    if norms:  # the k norm's width must be the q norm's kind (with one kv head both kinds are one head)
        k_rows = head_dim if qk_kind == "head" else n_kv * head_dim
        if len(norms) != 2 or norms["q_norm"][1:] != norms["k_norm"][1:] or \
                attn.k_norm.weight.shape[0] != k_rows:
            raise ValueError(f"from_module: q_norm and k_norm differ in presence, kind, eps or form ({norms})")
    scale = getattr(attn, "scaling", None)
    if causal is None:
        causal = bool(getattr(attn, "is_causal", True))
    w = mods[qkv_names[0]].weight
    if share_parameters and (attn._parameters or attn._buffers):
        raise ValueError(f"from_module(share_parameters=True): {type(attn).__name__} holds parameters or buffers "
                         "of its own; only its submodules can be shared")
    new = cls(d_model, n_heads, n_kv, causal=causal, bias=any(m.bias is not None for m in mods.values()),
              rope_theta=theta,
              recompute=recompute, device="meta" if share_parameters else w.device, dtype=w.dtype, head_dim=head_dim,
              scale=None if scale is None else float(scale), qk_norm=qk_kind, qk_norm_eps=qk_eps,
              qk_norm_offset=qk_offset, rotary_dim=rotary_dim,
              qkv_layout="separate" if layout == "separate" else "packed", **kwargs)
    if not isinstance(getattr(cls, "softcap", None), property):  # a subclass may read them at each call instead
        for k, v in _hf_options(attn).items():  # softcap, window, the dropouts' p (as they are now)
            if v:
                setattr(new, k, v)
    if share_parameters:  # the source's own modules (the meta placeholders are dropped)
        for name in list(new._modules):
            del new._modules[name]
        for name, child in attn.named_children():
            new.add_module(name, child)
        new._qkv_names, new._out_name, new.qkv_layout = qkv_names, out_name, layout
        new._record_children()
        new.train(attn.training)
        return new
    t = {}
    for n, m in mods.items():
        wt = m.weight.t() if _is_conv1d(m) else m.weight
        t[n] = (wt, m.bias)
    if layout == "separate":
        for n in qkv_names:
            _copy(getattr(new, n), *t[n])
    else:
        wp, bp = t[qkv_names[0]]
        _copy(new.qkv_proj, _packed_rows(wp, layout, n_heads, head_dim),
              None if bp is None else _packed_rows(bp, layout, n_heads, head_dim))
    _copy(new.o_proj, *t[out_name])
    for name in norms:
        with torch.no_grad():
            getattr(new, name).weight.copy_(getattr(attn, name).weight)
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
