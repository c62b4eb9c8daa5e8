"""``FusedCheckpointedBlock``: a pre-norm transformer block built from the fused modules."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..accounting import attention_saved_bytes
from ..ops.block import PARAM_NAMES, BlockFullRecompute, BlockSpec, full_saved_bytes
from ..ops.norm import norm_saved_bytes
from .attention import FusedCheckpointedAttention
from .ffn import FusedCheckpointedFFN
from .norm import FusedLayerNorm, FusedRMSNorm

BLOCK_RECOMPUTE = ("full", None)


class FusedCheckpointedBlock(nn.Module):
    """Pre-norm transformer block (Llama layout)::

        h = x + self_attn(input_layernorm(x))
        y = h + mlp(post_attention_layernorm(h))

    ==============  ===========================================  ===============================
    ``recompute``   kept for backward (besides parameters)       recomputed in backward
    ==============  ===========================================  ===============================
    ``"full"``      x and the per-row norm statistics            the whole block from x (see
                                                                 :mod:`fused_ckpt.ops.block`)
    ``None``        what each submodule's own dial keeps:        what each submodule's dial
                    norms x / h and their statistics,            says
                    ``self_attn.recompute``, ``mlp.recompute``
    ==============  ===========================================  ===============================

    Submodules: ``input_layernorm`` / ``post_attention_layernorm`` (:class:`FusedRMSNorm` or
    :class:`FusedLayerNorm`), ``self_attn`` (:class:`FusedCheckpointedAttention`, parameter
    names of Hugging Face ``LlamaAttention``), ``mlp`` (:class:`FusedCheckpointedFFN`).
    """

    def __init__(self, d_model: int, n_heads: int, d_ff: int, n_kv_heads: Optional[int] = None,
                 activation: str = "swiglu", norm: str = "rmsnorm", norm_eps: Optional[float] = None,
                 causal: bool = True, rope_theta: Optional[float] = 10000.0, bias: bool = False,
                 recompute: Optional[str] = "full", attn_recompute: Union[str, bool] = "qkv",
                 ffn_recompute: Union[str, bool] = True, device=None, dtype=None, *,
                 chunk_tokens: int = 0, backend: str = "auto"):
        super().__init__()
        if norm not in ("rmsnorm", "layernorm"):
            raise ValueError(f"norm must be 'rmsnorm' or 'layernorm', got {norm!r}")
        if recompute not in BLOCK_RECOMPUTE:
            raise ValueError(f"recompute must be one of {BLOCK_RECOMPUTE}, got {recompute!r}")
        factory = dict(device=device, dtype=dtype)
        self.norm = norm
        self.norm_eps = norm_eps if norm_eps is not None else (1e-6 if norm == "rmsnorm" else 1e-5)
        Norm = FusedRMSNorm if norm == "rmsnorm" else FusedLayerNorm
        self.input_layernorm = Norm(d_model, self.norm_eps, backend=backend, **factory)
        self.self_attn = FusedCheckpointedAttention(d_model, n_heads, n_kv_heads, causal=causal, bias=bias,
                                                    rope_theta=rope_theta, recompute=attn_recompute,
                                                    backend=backend, **factory)
        self.post_attention_layernorm = Norm(d_model, self.norm_eps, backend=backend, **factory)
        self.mlp = FusedCheckpointedFFN(d_model, d_ff, activation, bias=bias, recompute=ffn_recompute,
                                        chunk_tokens=chunk_tokens, backend=backend, **factory)
        self.recompute = recompute
        self.backend = backend

    def _spec(self) -> BlockSpec:
        a, m = self.self_attn, self.mlp
        return BlockSpec(self.norm, self.norm_eps, a.n_heads, a.n_kv_heads, a.causal, a.scale,
                         a.rope_theta, m.activation, m.chunk_tokens, self.backend)

    def _params(self) -> list:
        n1, n2, a, m = self.input_layernorm, self.post_attention_layernorm, self.self_attn, self.mlp
        tensors = {
            "norm1_w": n1.weight, "norm1_b": getattr(n1, "bias", None),
            "wq": a.q_proj.weight, "bq": a.q_proj.bias, "wk": a.k_proj.weight, "bk": a.k_proj.bias,
            "wv": a.v_proj.weight, "bv": a.v_proj.bias, "wo": a.o_proj.weight, "bo": a.o_proj.bias,
            "norm2_w": n2.weight, "norm2_b": getattr(n2, "bias", None),
        }
        w1, b1, w2, b2, w1u, b1u = m._ffn_tensors()  # the MLP's weights where they live
        tensors.update(w1=w1, b1=b1, w2=w2, b2=b2, w1u=w1u, b1u=b1u)
        return [tensors[n] for n in PARAM_NAMES]

    def forward(self, x: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self._whole_block_recompute(x):
            return self._full_recompute(x, position_ids, key_padding_mask)
        h = x + self.self_attn(self.input_layernorm(x), position_ids, key_padding_mask)
        return h + self.mlp(self.post_attention_layernorm(h))

    def _whole_block_recompute(self, x: torch.Tensor) -> bool:
        """Whether this call takes the whole-block path: ``recompute="full"`` and a backward
        will run (without one there is nothing to save, and the submodules run as they are)."""
        return self.recompute == "full" and torch.is_grad_enabled() and (
            x.requires_grad or any(p is not None and p.requires_grad for p in self._params()))

    def _full_recompute(self, x: torch.Tensor, position_ids: Optional[torch.Tensor],
                        key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"x must be (batch, seqlen, d_model), got shape {tuple(x.shape)}")
        return BlockFullRecompute.apply(self._spec(), x, position_ids, key_padding_mask, *self._params())

    def saved_bytes(self, batch: int, seq: int, dtype: Optional[torch.dtype] = None) -> int:
        """Activation bytes this block keeps for backward (parameters, position ids and masks
        excluded) at its current dials."""
        dtype = dtype or self.mlp.param_dtype
        elem = torch.empty((), dtype=dtype).element_size()
        tokens, d = batch * seq, self.mlp.d_model
        layer_norm = self.norm == "layernorm"
        if self.recompute == "full":
            return full_saved_bytes(tokens, d, elem, layer_norm)
        a = self.self_attn
        attn = attention_saved_bytes(tokens, d, a.n_heads, a.n_kv_heads, a.head_dim, a.recompute, elem)
        norms = 2 * norm_saved_bytes(tokens, d, elem, layer_norm)
        return norms + attn + self.mlp.saved_bytes(tokens, dtype=dtype)

    def extra_repr(self) -> str:
        return f"norm={self.norm!r}, recompute={self.recompute!r}"
