"""``FusedCheckpointedBlock``: a transformer block (pre-norm, sandwich-norm, post-norm or
parallel residual) built from the fused modules."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..accounting import attention_saved_bytes
from ..ops.block import (LORA_FFN_ROLES, LORA_ROLES, PARAM_NAMES, PLACEMENT_NORMS, PLACEMENTS, BlockFullRecompute,
                         BlockSpec, full_saved_bytes)
from ..ops.norm import norm_saved_bytes
from ._swap import swapped_child, warn_unfused
from .attention import FusedCheckpointedAttention
from .ffn import FusedCheckpointedFFN
from .norm import FusedLayerNorm, FusedRMSNorm

BLOCK_RECOMPUTE = ("full", None)

# The norms' submodule names for each placement (Hugging Face's names: Llama / Gemma2 / OLMo2 /
# GPT-NeoX); index 1: before the attention, 2: before the FFN, 3: after the attention, 4: after
# the FFN (ops/block.py PLACEMENT_NORMS).
NORM_NAMES = {
    "pre": {1: "input_layernorm", 2: "post_attention_layernorm"},
    "sandwich": {1: "input_layernorm", 3: "post_attention_layernorm", 2: "pre_feedforward_layernorm",
                 4: "post_feedforward_layernorm"},
    "post": {3: "post_attention_layernorm", 4: "post_feedforward_layernorm"},
    "parallel": {1: "input_layernorm", 2: "post_attention_layernorm"},
}


def attention_block_inputs(a: nn.Module) -> tuple:
    """``(tensors, options)`` of a fused attention module for the block op: tensors keyed by
    the block's PARAM_NAMES (wq ... bo, q_norm_w, k_norm_w; read where they live) and the
    attention keywords (qk_norm_eps, qk_norm_offset, rotary_dim, qkv_layout). An attention
    module that defines ``_block_inputs()`` returns them itself (packed or QK-normed ones)."""
    own = getattr(a, "_block_inputs", None)
    if own is not None:
        return own()
    tensors = {"wq": a.q_proj.weight, "bq": a.q_proj.bias, "wk": a.k_proj.weight, "bk": a.k_proj.bias,
               "wv": a.v_proj.weight, "bv": a.v_proj.bias, "wo": a.o_proj.weight, "bo": a.o_proj.bias,
               "q_norm_w": None, "k_norm_w": None}
    return tensors, {}


def attention_lora_bytes(a: nn.Module, tokens: int, dtype: torch.dtype) -> int:
    """Bytes a fused attention's own op keeps for PEFT LoRA adapters beyond the plain op (one
    ``[tokens, r]`` product per adapter in the factors' dtype, :func:`fused_ckpt.ops.attn_lora.
    attn_lora_saved_bytes`), 0 when it has none it computes in the op."""
    look = getattr(a, "_peft_lora", None)
    if look is None or swapped_child(a) is None:
        return 0
    got, _ = look(torch.empty((), dtype=dtype, device="meta"))
    if not got or not got["lora"]:
        return 0
    factors = [f[0] for f in got["lora"].values()]
    return tokens * sum(f.shape[0] for f in factors) * factors[0].element_size()


class FusedCheckpointedBlock(nn.Module):
    """Transformer block from the fused modules, with the norm placement ``placement``::

        "pre"       h = x + self_attn(input_layernorm(x)); y = h + mlp(post_attention_layernorm(h))
        "sandwich"  h = x + post_attention_layernorm(self_attn(input_layernorm(x)))
                    y = h + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))    (Gemma2/3)
        "post"      h = x + post_attention_layernorm(self_attn(x))
                    y = h + post_feedforward_layernorm(mlp(h))                                (OLMo2)
        "parallel"  y = x + self_attn(input_layernorm(x)) + mlp(post_attention_layernorm(x))  (GPT-NeoX)

    ==============  ===========================================  ===============================
    ``recompute``   kept for backward (besides parameters)       recomputed in backward
    ==============  ===========================================  ===============================
    ``"full"``      x and the per-row norm statistics (which:    the whole block from x (see
                    :mod:`fused_ckpt.ops.block`)                 :mod:`fused_ckpt.ops.block`)
    ``None``        what each submodule's own dial keeps:        what each submodule's dial
                    each norm its input and statistics,          says
                    ``self_attn.recompute``, ``mlp.recompute``
    ==============  ===========================================  ===============================

    Submodules: the norms named in :data:`NORM_NAMES` (:class:`FusedRMSNorm`, with
    ``norm_offset=1.0`` Gemma's ``(1 + w)`` form, or :class:`FusedLayerNorm`), ``self_attn``
    (:class:`FusedCheckpointedAttention`, parameter names of Hugging Face ``LlamaAttention``),
    ``mlp`` (:class:`FusedCheckpointedFFN`). Subclasses built around other modules (Hugging Face
    layers: GPT-2's ``ln_1``/``attn``, ...) set ``_roles`` (role -> submodule name).

    PEFT LoRA: projections of the attention / MLP wrapped by PEFT's ``lora.Linear`` after the block
    was built (``get_peft_model`` before or after patching) stay in the whole-layer op when every
    wrapper is vanilla LoRA on a frozen base with one LoRA dropout p (:meth:`_lora_spec`; the
    factors go into :mod:`fused_ckpt.ops.block`, which then also keeps the FFN adapters'
    ``[tokens, r]`` products); anything else (DoRA, a LoRA bias, a quantized or trainable base,
    two dropout p, autocast) makes the parts run their own forwards, with a warning naming why.
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, n_kv_heads: Optional[int] = None,
                 activation: str = "swiglu", norm: str = "rmsnorm", norm_eps: Optional[float] = None,
                 causal: bool = True, rope_theta: Optional[float] = 10000.0, bias: bool = False,
                 recompute: Optional[str] = "full", attn_recompute: Union[str, bool] = "qkv",
                 ffn_recompute: Union[str, bool] = True, device=None, dtype=None, *,
                 chunk_tokens: int = 0, backend: str = "auto", placement: str = "pre", norm_offset: float = 0.0):
        super().__init__()
        if norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"norm must be 'rmsnorm' or 'layernorm', got {norm!r}")
        if recompute not in BLOCK_RECOMPUTE:
            raise ValueError(f"recompute must be one of {BLOCK_RECOMPUTE}, got {recompute!r}")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if norm_offset and norm != "rmsnorm":
            raise ValueError(f"norm_offset={norm_offset} is for RMSNorm ((1 + w), Gemma); got norm={norm!r}")
        factory = dict(device=device, dtype=dtype)
        self.norm, self.placement, self.norm_offset = norm, placement, float(norm_offset)
        self.norm_eps = norm_eps if norm_eps is not None else (1e-6 if norm == "rmsnorm" else 1e-5)
        names = NORM_NAMES[placement]

        def make_norm():
            if norm == "rmsnorm":
                return FusedRMSNorm(d_model, self.norm_eps, backend=backend, offset=norm_offset, **factory)
            return FusedLayerNorm(d_model, self.norm_eps, backend=backend, **factory)

        if 1 in names:
            self.input_layernorm = make_norm()
        self.self_attn = FusedCheckpointedAttention(d_model, n_heads, n_kv_heads, causal=causal, bias=bias,
                                                    rope_theta=rope_theta, recompute=attn_recompute,
                                                    backend=backend, **factory)
        for i in (3, 2, 4):  # Hugging Face's registration order
            if i in names:
                setattr(self, names[i], make_norm())
        self.mlp = FusedCheckpointedFFN(d_model, d_ff, activation, bias=bias, recompute=ffn_recompute,
                                        chunk_tokens=chunk_tokens, backend=backend, **factory)
        self.recompute = recompute
        self.backend = backend

    # ------------------------------------------------------------------ roles
    @property
    def _roles(self) -> dict:
        """role ("attn", "mlp", or a norm index 1..4) -> submodule name."""
        roles = self.__dict__.get("_fused_roles")
        if roles is None:
            roles = {"attn": "self_attn", "mlp": "mlp", **NORM_NAMES[self.placement]}
        return roles

    @property
    def block_attention(self) -> nn.Module:
        return getattr(self, self._roles["attn"])

    @property
    def block_ffn(self) -> nn.Module:
        return getattr(self, self._roles["mlp"])

    def norm_module(self, i: int) -> Optional[nn.Module]:
        """The norm at position ``i`` (1: before the attention, 2: before the FFN, 3: after the
        attention, 4: after the FFN), or None when the placement has none there."""
        name = self._roles.get(i)
        return getattr(self, name) if name is not None else None

    def _spec(self) -> BlockSpec:
        a, m = self.block_attention, self.block_ffn
        _, opts = attention_block_inputs(a)
        opts = dict(opts)
        for k in ("softcap", "window"):  # the attention's options, when it has them
            opts.setdefault(k, getattr(a, k, None))
        if self.training:  # dropouts are replayed in training only
            opts.setdefault("dropout_p", getattr(a, "dropout_p", 0.0) or 0.0)
            out = [getattr(a, "out_dropout_p", 0.0) or 0.0, self._branch_dropout("attn_dropout")]
            ffn = [getattr(m, "dropout_p", 0.0) or 0.0, self._branch_dropout("ffn_dropout")]
            if min(out) or min(ffn):
                raise ValueError("fused_ckpt: two dropouts on one residual branch (the module's and the layer's)")
            opts.update(out_dropout_p=max(out), ffn_dropout_p=max(ffn))
        else:
            opts.update(dropout_p=0.0, out_dropout_p=0.0, ffn_dropout_p=0.0)
        return BlockSpec(self.norm, self.norm_eps, a.n_heads, a.n_kv_heads, a.causal, a.scale,
                         a.rope_theta, m.activation, m.chunk_tokens, self.backend, placement=self.placement,
                         norm_offset=self.norm_offset, **opts)

    def _lora_spec(self, x: torch.Tensor) -> tuple:
        """``((spec, LoRA tensors), None)``: the block op's spec and its LoRA inputs (LORA_NAMES
        order; empty without adapters) when the whole-layer op computes this layer exactly, with
        the PEFT LoRA wrappers that replaced projections of its attention / MLP after they were
        built (:func:`fused_ckpt.modules._swap.lora_of`: vanilla LoRA, several active adapters
        joined along r, merged or disabled adapters); ``(None, reason)`` otherwise."""
        a, m = self.block_attention, self.block_ffn
        found = {}
        p = None
        for role, part in (("attention", a), ("MLP", m)):
            if swapped_child(part) is None:
                continue
            got, why = part._peft_lora(x)  # the part's own reading of its wrappers (and its refusals)
            if got is None:
                return None, f"its {role}'s {why}"
            if isinstance(got, dict):  # the attention's: fused_attention_block's keywords, "qkv" = packed q
                lora, drop = {("q" if k == "qkv" else k): v for k, v in got["lora"].items()}, got["lora_dropout"]
            else:
                lora, drop = got
            if not lora:
                continue
            if p is not None and drop != p:
                return None, f"LoRA dropout {p} on the attention and {drop} on the MLP (the whole-layer op takes one)"
            p = drop
            found.update(lora)
        spec = self._spec()
        if not found:
            return (spec, ()), None
        trainable = [n for n, t in zip(PARAM_NAMES, self._params()) if t is not None and t.requires_grad]
        if trainable:
            return None, (f"PEFT LoRA with trainable base parameters ({', '.join(trainable)}): the whole-layer LoRA "
                          "path computes no base gradient (PEFT freezes every base parameter, norms included)")
        if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):
            return None, "PEFT LoRA under autocast"
        import dataclasses

        spec = dataclasses.replace(spec, lora=tuple((r, float(found[r][2])) for r in LORA_ROLES if r in found),
                                   lora_dropout_p=float(p or 0.0))
        tensors = [found[r][i] if r in found else None for r in LORA_ROLES for i in (0, 1)]
        return (spec, tensors), None

    def lora_roles(self) -> dict:
        """``{role: rank}`` of the PEFT LoRA adapters the whole-layer op computes (roles of
        :data:`fused_ckpt.ops.block.LORA_ROLES`), empty when there are none or it cannot take them."""
        w = self.block_ffn._ffn_tensors()[2]
        got, _ = self._lora_spec(torch.empty((), dtype=w.dtype, device="meta"))
        if got is None:
            return {}
        spec, tensors = got
        return {r: tensors[2 * LORA_ROLES.index(r)].shape[0] for r, _ in spec.lora}

    def _branch_dropout(self, role: str) -> float:
        """p of the ``nn.Dropout`` submodule in ``role`` ("attn_dropout": on the attention branch's
        output, "ffn_dropout": on the FFN branch's; Hugging Face GPT-NeoX / Phi-3 layers), or 0."""
        name = self._roles.get(role)
        d = getattr(self, name, None) if name is not None else None
        return float(d.p) if d is not None else 0.0

    def _params(self) -> list:
        tensors, _ = attention_block_inputs(self.block_attention)
        tensors = dict(tensors)
        for i in (1, 2, 3, 4):
            n = self.norm_module(i)
            tensors[f"norm{i}_w"] = None if n is None else n.weight
            tensors[f"norm{i}_b"] = None if n is None else getattr(n, "bias", None)
        w1, b1, w2, b2, w1u, b1u = self.block_ffn._ffn_tensors()  # the MLP's weights where they live
        tensors.update(w1=w1, b1=b1, w2=w2, b2=b2, w1u=w1u, b1u=b1u)
        return [tensors[n] for n in PARAM_NAMES]

    def forward(self, x: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self._whole_block_recompute(x):
            return self._full_recompute(x, position_ids, key_padding_mask)
        n = self.norm_module
        a = self.block_attention(n(1)(x) if n(1) is not None else x, position_ids, key_padding_mask)
        if n(3) is not None:
            a = n(3)(a)
        if self.placement == "parallel":
            return (self.block_ffn(n(2)(x)) + a) + x
        h = x + a
        f = self.block_ffn(n(2)(h) if n(2) is not None else h)
        return h + (n(4)(f) if n(4) is not None else f)

    def _whole_block_recompute(self, x: torch.Tensor) -> bool:
        """Whether this call takes the whole-block path: ``recompute="full"`` and a backward
        will run (without one there is nothing to save, and the submodules run as they are), and
        the parts are still the fused modules with the children they were built from (else the
        submodules run: each takes its exact unfused path, e.g. around PEFT LoRA wrappers)."""
        if self.recompute != "full" or not torch.is_grad_enabled():
            return False
        why = self._parts_changed()
        got = None
        if why is None:
            got, why = self._lora_spec(x)
        if why is not None:
            warn_unfused(self, why, "its parts run their own forwards (no whole-layer recompute)")
            return False
        return (x.requires_grad or any(p is not None and p.requires_grad for p in self._params())
                or any(t is not None and t.requires_grad for t in got[1]))

    def _parts_changed(self):
        """None when the whole-block op can read every weight it needs from the parts, else why not
        (a part that is no longer a fused module, or a norm that is no longer a fused norm);
        replaced projections inside the parts are judged by :meth:`_lora_spec`."""
        a, m = self.block_attention, self.block_ffn
        if not isinstance(a, FusedCheckpointedAttention) or not isinstance(m, FusedCheckpointedFFN):
            return f"its attention / MLP are now {type(a).__name__} / {type(m).__name__}, not fused modules"
        for i in (1, 2, 3, 4):
            n = self.norm_module(i)
            if n is not None and not isinstance(n, (FusedRMSNorm, FusedLayerNorm)):
                return f"its norm {self._roles[i]} is now a {type(n).__name__}, not a fused norm"
        return None

    def _full_recompute(self, x: torch.Tensor, position_ids: Optional[torch.Tensor],
                        key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"x must be (batch, seqlen, d_model), got shape {tuple(x.shape)}")
        got, why = self._lora_spec(x)
        if got is None:
            raise ValueError(f"fused_ckpt: {type(self).__name__}: the whole-layer op cannot run this layer: {why}")
        spec, lora = got
        return BlockFullRecompute.apply(spec, x, position_ids, key_padding_mask, *self._params(), *lora)

    def norm_count(self) -> int:
        return len(PLACEMENT_NORMS[self.placement])

    def full_saved_bytes(self, tokens: int, dtype: Optional[torch.dtype] = None) -> int:
        """Bytes the whole-block "full" path keeps for ``tokens`` tokens (x, the norms' per-row
        statistics and, with PEFT LoRA on the MLP, its adapters' ``[tokens, r]`` products:
        :func:`fused_ckpt.ops.block.full_saved_bytes`)."""
        dtype = dtype or self.block_ffn.param_dtype
        elem = torch.empty((), dtype=dtype).element_size()
        ranks, lora_elem, _ = self.lora_costs(tokens, dtype)
        return full_saved_bytes(tokens, self.block_ffn.d_model, elem, self.norm == "layernorm", self.placement,
                                ranks, lora_elem)

    def lora_costs(self, tokens: int, dtype: Optional[torch.dtype] = None) -> tuple:
        """``(FFN adapter ranks, the factors' element size, recompute FLOPs)`` of the PEFT LoRA
        adapters the whole-layer op computes (``((), 0, 0)`` without any): the FFN adapters'
        ``[tokens, r]`` products are what the "full" path keeps for them (without a norm after the
        FFN); the FLOPs are the rank-r GEMMs the backward re-runs beyond the FFN's own recompute
        (:meth:`FusedCheckpointedFFN.recompute_flops`): 2 T r (in + out) per attention adapter
        (the attention half is re-run), and per FFN adapter too when a norm after the FFN makes
        the backward re-run the FFN forward."""
        dtype = dtype or self.block_ffn.param_dtype
        got, _ = self._lora_spec(torch.empty((), dtype=dtype, device="meta"))
        if got is None or not got[0].lora:
            return (), 0, 0
        spec, tensors = got
        factors = {r: (tensors[2 * LORA_ROLES.index(r)], tensors[2 * LORA_ROLES.index(r) + 1]) for r, _ in spec.lora}
        ffn = [a for r, (a, _) in factors.items() if r in LORA_FFN_ROLES]
        rerun = [r for r in factors if r not in LORA_FFN_ROLES or spec.has(4)]
        flops = sum(2 * tokens * factors[r][0].shape[0] * (factors[r][0].shape[1] + factors[r][1].shape[0])
                    for r in rerun)
        return tuple(a.shape[0] for a in ffn), (ffn[0].element_size() if ffn else 0), flops

    def norms_saved_bytes(self, tokens: int, dtype: Optional[torch.dtype] = None) -> int:
        """Bytes the block's norms keep under the per-module dials (each its input and
        statistics; "parallel": both norms keep the same x, held once)."""
        elem = torch.empty((), dtype=dtype or self.block_ffn.param_dtype).element_size()
        d = self.block_ffn.d_model
        n = self.norm_count() * norm_saved_bytes(tokens, d, elem, self.norm == "layernorm")
        return n - tokens * d * elem if self.placement == "parallel" else n

    def saved_bytes(self, batch: int, seq: int, dtype: Optional[torch.dtype] = None) -> int:
        """Activation bytes this block keeps for backward (parameters, position ids and masks
        excluded) at its current dials."""
        dtype = dtype or self.block_ffn.param_dtype
        elem = torch.empty((), dtype=dtype).element_size()
        tokens = batch * seq
        if self.recompute == "full":
            return self.full_saved_bytes(tokens, dtype)
        a = self.block_attention
        attn = attention_saved_bytes(tokens, a.d_model, a.n_heads, a.n_kv_heads, a.head_dim, a.recompute, elem)
        attn += attention_lora_bytes(a, tokens, dtype)  # PEFT LoRA in the attention op: its [tokens, r]
        return self.norms_saved_bytes(tokens, dtype) + attn + self.block_ffn.saved_bytes(tokens, dtype=dtype)

    def extra_repr(self) -> str:
        return (f"norm={self.norm!r}, placement={self.placement!r}"
                + (f", norm_offset={self.norm_offset}" if self.norm_offset else "") + f", recompute={self.recompute!r}")
