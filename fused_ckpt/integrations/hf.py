"""Hugging Face integration: patch an already-built model in place with fused modules.

``patch_hf_model(model, policy="full")`` walks the model's decoder layers and

* replaces each MLP that :meth:`FusedCheckpointedFFN.from_module` converts (Llama, Mistral,
  Qwen2: ``gate_proj/up_proj/down_proj``; Gemma: the same with tanh-GELU, i.e. GeGLU; Phi-3:
  packed ``gate_up_proj``; GPT-2: ``c_fc/c_proj`` Conv1D) by a :class:`FusedSharedFFN` holding
  the MLP's own submodules, after checking that the activation the module computes (identified by
  evaluating it) is the one the config names (``hidden_act`` / ``hidden_activation`` /
  ``activation_function``);
* replaces each attention of a known projection layout (default or partial rotary embedding,
  QK-norm, Gemma 2's logit soft-capping, sliding windows, GPT-2's attention dropouts; no
  clipping or other dropout: see "Config fields" below) by :class:`FusedHFAttention`, a
  :class:`FusedCheckpointedAttention` that accepts the Hugging Face call and keeps Hugging Face's
  parameter names (its state dict loads into the original attention as is);
* replaces each Llama-style RMSNorm (identified by evaluating it: ``w * x * rsqrt(mean(x^2) + eps)``;
  Gemma's ``(1 + w)`` form is left alone) by :class:`FusedRMSNorm`, which keeps x and an fp32
  per-row rstd instead of an fp32 copy of x;
* then replaces each decoder layer whose four parts all became fused modules and whose forward
  is the Llama pre-norm layout (checked by evaluation) by :class:`FusedHFDecoderLayer`, a
  :class:`FusedCheckpointedBlock` with the Hugging Face layer call: policies can recompute the
  whole layer from its input (x and two per-row rstd kept, less than Hugging Face's own
  checkpointing keeps) and the backward recomputes inside the fused kernels (``blocks=False``
  keeps the layers, with per-module dials only); parts holding PEFT LoRA wrappers (vanilla LoRA,
  frozen base) stay whole, the adapters computed in the block op (the report says "with PEFT
  LoRA on ..."; :class:`FusedCheckpointedBlock` for what is refused);
* leaves everything else alone and says why (GPT-2's and Phi-3's packed ``c_attn``/``qkv_proj``
  dropouts the fused ops do not take, unknown activations, ...),

Sliding windows (Mistral, Qwen2 ``use_sliding_window``, Gemma 2/3 sliding layers): the fused
kernels' window mask (query i sees key j iff ``i - window < j <= i``, Hugging Face's
``sliding_window``), at every length. Logit soft-capping (Gemma 2 ``attn_logit_softcapping``):
the fused op's ``softcap`` (after the scaling, before the masks, as Hugging Face). GPT-2's
``attn_dropout`` / ``resid_dropout``: the fused op's replayed ``dropout_p`` / ``out_dropout_p``,
their ``p`` read from the modules at each call, in training mode only (``eval()``, ``train()``
and a changed ``p`` are honoured); :func:`fused_ckpt.ops.dropout.fused_dropout_masks` makes an
unpatched model draw the same masks for comparisons.

then applies ``policy`` with :func:`fused_ckpt.apply_checkpointing`.

Identity: patching keeps the model's parameters. Every replacement holds the original
submodules (``q_proj``, ``gate_proj``, ``up_proj``, ``down_proj``, ``c_fc``, ...) or, for norms,
the original ``weight`` Parameter, under the original names, so ``model.parameters()`` yields
the same ``nn.Parameter`` objects in the same order, ``state_dict()`` has the same keys and
layout, and module names are unchanged: an optimizer built before patching keeps training
every parameter, ``save_pretrained()`` / ``from_pretrained()`` round-trip as for the unpatched
model, and PEFT ``target_modules`` find their modules. The fused ops read the weights where
they live (separate gate and up weights as two tensors, a packed ``gate_up_proj`` as two views,
Conv1D weights transposed through strides). :func:`hf_state_dict` and :func:`hf_layout` remain
as identities for code written against the earlier renaming layout.

Interplay with ``gradient_checkpointing_enable()`` (Hugging Face activation checkpointing)
-----------------------------------------------------------------------------------------
The two would recompute twice (a checkpointed layer whose fused modules recompute again inside
the replay) and HF's checkpoint would hide the fused modules' small saved set behind a
re-run of the whole layer. Decision: fused_ckpt owns recomputation of every decoder layer
after patching. If HF checkpointing is on when patching, it is switched off on the layers
(listed in the report); if it is switched on later, a forward pre-hook switches it off again on
those layers at their next call, with a warning. To checkpoint non-fused parts, use the
policies (:mod:`fused_ckpt.policy`: checkpoint sites).

Training with a KV cache: Hugging Face models create a ``DynamicCache`` even in training unless
``use_cache=False``. As HF's own checkpointing does, the fused attention does not fill it in
training (warning once); with gradients off (evaluation, generation) a patched attention with a
cache runs Hugging Face's own code path on the same weights, so generation works.

Attention masks: ``None`` (causal) and 4-D masks that are exactly causal + key padding are
supported (the padding becomes the fused key-padding mask). Anything else (packed sequences,
custom masks) runs Hugging Face's path for that call, with a warning. Query rows that see no key
(left padding) follow the configured implementation, and such rows do carry loss (with Hugging
Face's shifted labels the last pad position predicts the first real token): SDPA (torch >= 2.5)
outputs zero there, as the fused kernels do; eager adds a large finite negative to every masked
score, so such a row weighs every key (pad and future keys too) by 1/S, with gradients to q and
k. Under eager the fused attention adds exactly that for those rows (Hugging Face's eager
operations on those rows only, recomputed in backward), and a whole-layer block hands such calls
to the layer's own forward on the fused parts.

Config fields: every field that the attention, rotary-embedding or decoder-layer code of a
model reads is a row of ``_FIELDS`` (computed exactly, refused unless it has a neutral value,
checked by evaluation, or applied outside the replaced modules); a part whose code reads a
field missing from the table is left alone, naming the field. Each fused attention is also
compared with Hugging Face's forward on a float64 probe before it replaces it (catches what no
field says, e.g. Cohere's interleaved rotary convention).
"""
from __future__ import annotations

import functools
import inspect
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.utils.checkpoint
from torch import nn

from ..modules.attention import FusedCheckpointedAttention, hf_projection_layout
from ..modules.attention import _from_hf as _attention_from_hf
from ..modules.block import FusedCheckpointedBlock
from ..modules.ffn import FusedCheckpointedFFN, FusedSharedFFN  # noqa: F401 (FusedSharedFFN: documented)
from ..modules._swap import swapped_child, warn_unfused
from ..modules.norm import FusedLayerNorm, FusedRMSNorm
from ..policy import CheckpointPlan, _hf_gc_guard, apply_checkpointing, find_layers, install_hf_guard

# Hugging Face activation names -> the base function they compute.
_HF_ACT_BASE = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu"}
_FUSED_BASE = {"swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}

def _warn(msg: str) -> None:
    # Python's default warning filter shows each of these once per call site
    warnings.warn(msg, stacklevel=3)


# ============================================================================ attention
class FusedHFAttention(FusedCheckpointedAttention):
    """:class:`FusedCheckpointedAttention` with the Hugging Face attention call:
    ``forward(hidden_states, position_embeddings=None, attention_mask=None, cache=None,
    position_ids=None, **kwargs) -> (output, None)`` (the cache also as ``past_key_values``,
    ``past_key_value`` or GPT-NeoX's ``layer_past``).

    It holds the Hugging Face attention's own submodules under their names: the projections of
    any layout in :data:`fused_ckpt.modules.attention.HF_PROJECTIONS` (``q_proj``/``k_proj``/
    ``v_proj``/``o_proj``; Phi-3 ``qkv_proj``; GPT-2 ``c_attn``/``c_proj`` Conv1D, read
    transposed; GPT-NeoX ``query_key_value``/``dense``, interleaved per head), the QK-norms
    ``q_norm``/``k_norm`` and the dropouts, read where they live at each call. The
    rotary embedding (full or partial) is computed from ``position_ids`` in the fused op (same
    tables as Hugging Face's default rope); ``position_embeddings`` are used only on the
    Hugging Face path (a KV cache with gradients off, or a mask that is not causal + key
    padding) and by the eager fix-up of rows that see no key.
    """

    @classmethod
    def from_hf(cls, attn: nn.Module, recompute="qkv", **kwargs) -> "FusedHFAttention":
        new = _attention_from_hf(cls, attn, recompute, None, share_parameters=True, **kwargs)
        for k, v in attn.__dict__.items():  # config, layer_idx, scaling, ... (read by Hugging Face's forward)
            if not k.startswith("_") and k != "training" and k not in new.__dict__ \
                    and not isinstance(v, (nn.Module, torch.Tensor)):
                new.__dict__[k] = v
        new.__dict__["_fused_window"] = _sliding_window(attn, getattr(attn, "config", None))
        new.__dict__["_hf_forward"] = type(attn).forward
        new.__dict__["_hf_cache_kw"] = _cache_kw(type(attn).forward)
        return new

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, position_ids=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        for key in ("past_key_value", "layer_past"):  # other families' names for it
            c = kwargs.pop(key, None)
            cache = c if cache is None else cache
        why = swapped_child(self)
        lora = False
        if why is not None:  # a projection replaced after patching: PEFT LoRA in the fused op, else Hugging Face's code
            found, why_not = self._peft_lora(hidden_states)
            if found is None:
                warn_unfused(self, why_not or why)
                return self._hf(hidden_states, position_embeddings, attention_mask, cache, position_ids, kwargs)
            lora = bool(found["lora"])
        training = self.training and torch.is_grad_enabled()
        if cache is not None and not training:
            return self._hf(hidden_states, position_embeddings, attention_mask, cache, position_ids, kwargs)
        B, S = hidden_states.shape[0], hidden_states.shape[1]
        kpm = _key_padding(attention_mask, B, S, self.window)
        if kpm is _UNSUPPORTED:
            _warn("fused_ckpt: an attention mask that is not causal + key padding (+ the layer's sliding window) "
                  "was passed; running Hugging Face's attention for it (no fused recompute)")
            return self._hf(hidden_states, position_embeddings, attention_mask, None, position_ids, kwargs)
        dead = self.eager_dead_rows(kpm)
        if dead is not None and (self.dropout_p or self.out_dropout_p or lora):
            # the eager fix-up of rows that see no key does not draw the fused dropout masks on them, nor
            # add the LoRA terms (it reads the base weights)
            _warn("fused_ckpt: left-padded rows that see no key under eager attention with active dropout or PEFT "
                  "LoRA; running Hugging Face's attention for this call (no fused recompute)")
            return self._hf(hidden_states, position_embeddings, attention_mask, None, position_ids, kwargs)
        if cache is not None:
            _warn("fused_ckpt: the fused attention does not fill the KV cache in training "
                  "(as with Hugging Face checkpointing); pass use_cache=False")
        pos = _positions(position_ids, B, S)
        y = super().forward(hidden_states, position_ids=pos, key_padding_mask=kpm)
        if dead is not None:
            y = self._eager_fixup(y, hidden_states, dead, attention_mask, position_embeddings, pos)
        return y, None

    # ------------------------------------------------------------ the attention options, read at each call
    @property
    def softcap(self) -> Optional[float]:
        """The adopted module's ``attn_logit_softcapping`` (Gemma 2/3): ``cap * tanh(s / cap)``
        after the scaling and before the masks, as Hugging Face's attention computes it."""
        cap = self.__dict__.get("attn_logit_softcapping")
        return float(cap) if cap else None

    @property
    def window(self) -> Optional[int]:
        """The sliding window (query i sees key j iff ``i - window < j <= i``, Hugging Face's
        ``sliding_window``), applied by the fused kernels at every length; None: full attention."""
        return self.__dict__.get("_fused_window")

    @property
    def dropout_p(self) -> float:
        """GPT-2's ``attn_dropout`` (on the probabilities): its ``p`` now, in training mode; else 0."""
        return self._dropout_of("attn_dropout")

    @property
    def out_dropout_p(self) -> float:
        """GPT-2's ``resid_dropout`` (on the output): its ``p`` now, in training mode; else 0."""
        return self._dropout_of("resid_dropout")

    def _dropout_of(self, name: str) -> float:
        d = self._modules.get(name)
        return float(d.p) if self.training and isinstance(d, nn.Dropout) else 0.0

    # ------------------------------------------------------------ rows that see no key
    def eager_dead_rows(self, kpm) -> Optional[list]:
        """``[(batch index, n)]``: the batch rows whose first ``n`` query rows see no key (left
        padding), when the configured implementation is eager; None when there are none or the
        implementation is another one.

        Hugging Face's eager attention adds a large finite negative to every masked score, so in
        such a row every score becomes the same number and the softmax gives weight ``1/S`` to
        every key (padding and future keys included), with gradients flowing to q and k as
        through any softmax. SDPA (torch >= 2.5) and the fused kernels give such a row zero
        output; under eager the fused output is corrected for those rows (:meth:`_eager_fixup`).
        """
        if kpm is None or getattr(getattr(self, "config", None), "_attn_implementation", None) not in (None, "eager"):
            return None
        ref = _dead_cache[0]
        if ref is not None and ref() is kpm:
            return _dead_cache[1]
        seen = kpm.to(torch.uint8).cummax(dim=1).values  # 1 from the first visible key on (causal)
        counts = (seen == 0).sum(dim=1).tolist()
        out = [(b, n) for b, n in enumerate(counts) if n] or None
        _dead_cache[0], _dead_cache[1] = weakref.ref(kpm), out
        return out

    def _eager_fixup(self, y, x, dead, attention_mask, position_embeddings, pos):
        """Add Hugging Face eager's output for the query rows that see no key (the fused output
        there is ``o_proj`` of zero, i.e. its bias): the same operations as Hugging Face's eager
        attention for those rows only (scores + the mask's rows, fp32 softmax, weights in the
        model dtype), recomputed in backward from x (checkpointed) so nothing else is kept."""
        B, S = x.shape[0], x.shape[1]
        if self.rope_theta is None:
            cos = sin = None
        elif position_embeddings is not None:
            cos, sin = position_embeddings
        else:
            cos, sin = _rope_tables(self.rope_theta, self.rotary_dim or self.head_dim, pos, S, x)
        mask = attention_mask
        if mask.dtype == torch.bool:  # as Hugging Face's eager mask: 0 where visible, dtype min elsewhere
            mask = torch.zeros((), dtype=x.dtype, device=x.device).masked_fill(~mask, torch.finfo(x.dtype).min)

        def rows(x, cos, sin):
            H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
            scale = self.scale if self.scale is not None else D ** -0.5
            t = self._block_inputs()[0]
            outs = []
            for b, n in dead:
                q, k, v = (u[0].transpose(0, 1) for u in _eager_qkv(self, x[b:b + 1], t))  # [heads, S, D]
                q = q[:, :n]
                if cos is not None:
                    c, s_ = cos[b if cos.shape[0] > 1 else 0], sin[b if sin.shape[0] > 1 else 0]
                    q = _apply_rope(q, c[:n], s_[:n])
                    k = _apply_rope(k, c, s_)
                k, v = k.repeat_interleave(H // Hkv, dim=0), v.repeat_interleave(H // Hkv, dim=0)
                scores = torch.matmul(q, k.transpose(1, 2)) * scale
                if self.softcap:  # Hugging Face's order: scale, soft-cap, mask
                    scores = torch.tanh(scores / self.softcap) * self.softcap
                scores = scores + mask[b if mask.shape[0] > 1 else 0, 0, :n]
                p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
                a = torch.matmul(p, v).transpose(0, 1).reshape(n, H * D)
                outs.append(nn.functional.linear(a, t["wo"]))
            return torch.cat(outs)

        if torch.is_grad_enabled():
            fix = torch.utils.checkpoint.checkpoint(rows, x, cos, sin, use_reentrant=False)
        else:
            fix = rows(x, cos, sin)
        b_idx = torch.tensor([b for b, n in dead for _ in range(n)], device=x.device)
        i_idx = torch.tensor([i for _, n in dead for i in range(n)], device=x.device)
        return y.index_put((b_idx, i_idx), fix.to(y.dtype), accumulate=True)

    def _hf(self, hidden_states, position_embeddings, attention_mask, cache, position_ids, kwargs):
        if position_embeddings is None and self.rope_theta is not None:
            raise ValueError("fused_ckpt: the Hugging Face attention path needs position_embeddings")
        kwargs = dict(kwargs)
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        if position_embeddings is not None:
            kwargs["position_embeddings"] = position_embeddings
        kwargs[self._hf_cache_kw] = cache
        return self._hf_forward(self, hidden_states, attention_mask=attention_mask, **kwargs)


def _eager_qkv(attn: FusedCheckpointedAttention, x: torch.Tensor, t: dict) -> tuple:
    """q, k, v ``[B, S, heads, D]`` of a fused attention in plain PyTorch, in Hugging Face's
    order: projection(s) (packed ones split as the op splits them), then the QK-norm modules
    themselves (per head, or over the whole projection), no rotary."""
    from ..ops.attention import _raw_qkv

    q, k, v = _raw_qkv(x, t["wq"], t["bq"], t["wk"], t["bk"], t["wv"], t["bv"], attn.n_heads, attn.n_kv_heads,
                       attn.head_dim, attn.qkv_layout)
    out = []
    for u, name in ((q, "q_norm"), (k, "k_norm")):
        norm = attn._modules.get(name)
        if norm is not None:
            u = norm(u) if norm.weight.shape[0] == u.shape[-1] else norm(u.flatten(2)).view(u.shape)
        out.append(u)
    return out[0], out[1], v


def _apply_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's ``apply_rotary_pos_emb`` on ``t [..., S, D]``: the first ``cos.shape[-1]``
    dims rotated (rotate_half), the rest passed through (partial rotary)."""
    R = cos.shape[-1]
    r = t[..., :R]
    return torch.cat((r * cos + _rotate_half(r) * sin, t[..., R:]), -1)


# ============================================================================ decoder layers
@dataclass(frozen=True)
class _LayerRow:
    """One row of the family table: how a Hugging Face decoder layer's children map to the
    roles of :class:`FusedCheckpointedBlock` (``attn``, ``mlp``, norms 1..4 by position: 1 before
    the attention, 2 before the MLP, 3 after the attention, 4 after the MLP, see
    :mod:`fused_ckpt.ops.block`). ``placements``: the candidate norm placements with the norms'
    child names, tried in order; the one the layer's forward agrees with on a probe is taken.
    ``dropouts``: the ``nn.Dropout`` children on the attention and the MLP branch's outputs
    (optional), replayed inside the whole-layer block in training.
    Norm kinds (RMSNorm, ``(1 + w)`` RMSNorm, LayerNorm with bias) are not in the table: each norm
    is identified by evaluating it (:func:`_convert_norm`)."""

    families: str
    attn: str
    mlp: str
    placements: dict
    dropouts: tuple = ()


_PRE = {1: "input_layernorm", 2: "post_attention_layernorm"}
_LAYER_ROWS = (
    _LayerRow("Llama, Mistral, Qwen2, Qwen3, Gemma, Phi-3", "self_attn", "mlp", {"pre": _PRE},
              ("resid_attn_dropout", "resid_mlp_dropout")),
    _LayerRow("Gemma2, Gemma3", "self_attn", "mlp",
              {"sandwich": {1: "input_layernorm", 3: "post_attention_layernorm", 2: "pre_feedforward_layernorm",
                            4: "post_feedforward_layernorm"}}),
    _LayerRow("OLMo2", "self_attn", "mlp", {"post": {3: "post_attention_layernorm", 4: "post_feedforward_layernorm"}}),
    _LayerRow("GPT-2", "attn", "mlp", {"pre": {1: "ln_1", 2: "ln_2"}}),
    _LayerRow("GPT-NeoX (use_parallel_residual True / False)", "attention", "mlp", {"parallel": _PRE, "pre": _PRE},
              ("post_attention_dropout", "post_mlp_dropout")),
)
_LAYOUT_MATH = {
    "pre": "the pre-norm residual layout h = x + attn(n1(x)); y = h + mlp(n2(h))",
    "sandwich": "the sandwich-norm residual layout h = x + n3(attn(n1(x))); y = h + n4(mlp(n2(h)))",
    "post": "the post-norm residual layout h = x + n3(attn(x)); y = h + n4(mlp(h))",
    "parallel": "the parallel residual layout y = x + attn(n1(x)) + mlp(n2(x))",
}


def _layer_row(parts: dict) -> tuple:
    """``(row, norm placements)`` of the family table whose roles name exactly ``parts`` (the
    layer's children, optional dropouts aside), or ``(None, reason)``."""
    names = set(parts)
    for row in _LAYER_ROWS:
        core = names - set(row.dropouts)
        fits = {pl: norms for pl, norms in row.placements.items()
                if core == {row.attn, row.mlp, *norms.values()}}
        if fits:
            return row, fits
    return None, (f"its parts {sorted(names)} match no layer layout of the family table "
                  f"(integrations/hf.py _LAYER_ROWS: {'; '.join(r.families for r in _LAYER_ROWS)})")


class FusedHFDecoderLayer(FusedCheckpointedBlock):
    """A Hugging Face decoder layer whose parts fused_ckpt already replaced, as a
    :class:`FusedCheckpointedBlock`: pre-norm (Llama, Mistral, Qwen2/3, Gemma, Phi-3, GPT-2,
    GPT-NeoX sequential), sandwich norms (Gemma2/3), post-norms (OLMo2) or the parallel residual
    (GPT-NeoX), with the norm kind each family uses; the layout comes from the family table
    (``_LAYER_ROWS``) and is checked by evaluation. With ``recompute="full"`` it keeps only its
    input and the norms' per-row statistics, less than Hugging Face's per-layer checkpointing,
    and the backward recomputes inside the fused kernels.

    It takes the Hugging Face layer's own call (bound to its signature: Llama's keywords, GPT-2's
    positional ``(hidden_states, cache, attention_mask, encoder_hidden_states, ...)``, GPT-NeoX's
    ``layer_past``, ...) and returns what the layer returns. Calls the whole-block path cannot
    take exactly (a KV cache with gradients off, a mask that is not causal + key padding,
    cross-attention inputs, attention weights asked for) and calls under the per-module dials
    (``recompute=None``) run the original layer's own forward on the fused parts, which handle
    the Hugging Face call themselves. Module names and the state dict are the layer's own.
    """

    @classmethod
    def from_hf(cls, layer: nn.Module, backend: str):
        """``(block, detail)``, or ``(None, reason)`` when ``layer`` is not a layout of the family
        table made of fused parts, or its forward does not compute that layout on a probe."""
        parts = dict(layer.named_children())
        row, placements = _layer_row(parts)
        if row is None:
            return None, placements
        attn, mlp = parts[row.attn], parts[row.mlp]
        if not isinstance(attn, FusedHFAttention):
            return None, f"{row.attn} is a {type(attn).__name__}, not a FusedHFAttention"
        if not isinstance(mlp, FusedCheckpointedFFN):
            return None, f"{row.mlp} is a {type(mlp).__name__}, not a FusedCheckpointedFFN"
        for name in row.dropouts:
            d = parts.get(name)
            if d is not None and type(d) is not nn.Dropout:
                return None, f"{name} is a {type(d).__name__}, not an nn.Dropout"
        norm_names = sorted({n for norms in placements.values() for n in norms.values()})
        kinds = {}
        for name in norm_names:
            n = parts[name]
            if not isinstance(n, (FusedRMSNorm, FusedLayerNorm)):
                return None, f"{name} is a {type(n).__name__}, not a FusedRMSNorm or FusedLayerNorm"
            kinds[name] = (type(n).__name__, getattr(n, "offset", 0.0), n.eps, getattr(n, "bias", None) is not None)
        if len(set(kinds.values())) > 1:
            return None, f"the norms differ in kind, (1 + w) offset, eps or bias: {kinds}"
        if layer._parameters or layer._buffers:
            return None, "the layer holds its own parameters or buffers"
        why = _config_refusal(getattr(attn, "config", None), layer, _L, _own_classes(layer))
        if why is not None:
            return None, why
        first = parts[norm_names[0]]
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for k, v in layer.__dict__.items():  # hidden_size, attention_type, ... (read by HF model loops)
            if not k.startswith("_") and k != "training" and not isinstance(v, (nn.Module, torch.Tensor)):
                new.__dict__[k] = v
        for name, child in parts.items():  # the layer's own order: parameters and state dict keep theirs
            setattr(new, name, child)
        new.norm = "rmsnorm" if isinstance(first, FusedRMSNorm) else "layernorm"
        new.norm_offset, new.norm_eps = getattr(first, "offset", 0.0), first.eps
        new.recompute, new.backend = "full", backend
        new.gradient_checkpointing = False
        new.train(layer.training)
        new.__dict__["_hf_forward"] = type(layer).forward
        new.__dict__["_hf_signature"] = sig = inspect.signature(type(layer).forward)
        new.__dict__["_hf_first"] = list(sig.parameters)[1]  # the hidden states
        new.__dict__["_hf_cache_kw"] = _cache_kw(type(layer).forward)
        tried = []
        for placement, norms in placements.items():
            new.placement = placement
            new.__dict__["_fused_roles"] = {"attn": row.attn, "mlp": row.mlp, **norms, **{
                role: name for role, name in zip(("attn_dropout", "ffn_dropout"), row.dropouts) if name in parts}}
            lora, why = _layer_lora(new, row)
            if lora is None:  # PEFT wrappers the whole-layer op cannot compute exactly
                return None, why
            why = _same_as_hf(new, layer)
            if why is None:
                kind = {"FusedRMSNorm": "RMSNorm", "FusedLayerNorm": "LayerNorm"}[type(first).__name__]
                kind = "(1 + w) RMSNorm" if new.norm_offset else kind
                lora = f", with PEFT LoRA on {', '.join(lora)} in the whole-layer op" if lora else ""
                return new, f"FusedHFDecoderLayer: whole-layer recompute ({row.families.split(' (')[0]} " \
                            f"row; {placement} placement, {kind}){lora}"
            tried.append(_LAYOUT_MATH[placement])
        return None, f"its forward is not {' nor '.join(tried)} ({why})"

    def forward(self, *args, **kwargs):
        bound = self._hf_signature.bind(self, *args, **kwargs)
        a = dict(bound.arguments)
        var_kw = next((n for n, p in self._hf_signature.parameters.items() if p.kind is p.VAR_KEYWORD), None)
        extra = dict(a.pop(var_kw, {})) if var_kw else {}
        a.update(extra)
        hidden_states = a[self._hf_first]
        cache = None
        for key in _CACHE_KEYS:  # the name differs across families and transformers versions
            c = a.get(key)
            cache = c if c is not None else cache
        generating = cache is not None and not (self.training and torch.is_grad_enabled())
        plain = not generating and not a.get("output_attentions") and a.get("encoder_hidden_states") is None
        if plain and self._whole_block_recompute(hidden_states):
            B, S = hidden_states.shape[0], hidden_states.shape[1]
            kpm = _key_padding(a.get("attention_mask"), B, S, self.block_attention.window)
            # eager rows that see no key need the attention's fix-up, which the block cannot
            # apply inside itself: the layer's own forward runs on the fused parts
            if kpm is not _UNSUPPORTED and self.block_attention.eager_dead_rows(kpm) is None:
                if cache is not None:
                    _warn("fused_ckpt: the fused attention does not fill the KV cache in training "
                          "(as with Hugging Face checkpointing); pass use_cache=False")
                pos = _positions(a.get("position_ids"), B, S) if self.block_attention.rope_theta is not None else None
                y = self._full_recompute(hidden_states, pos, kpm)
                return (y,) if self._hf_tuple else y
        return self._hf_forward(self, *args, **kwargs)


def _layer_lora(block: FusedHFDecoderLayer, row: _LayerRow) -> tuple:
    """``([qualified child names], None)``: the PEFT LoRA wrappers inside the layer's attention and
    MLP (``self_attn.q_proj``, ...; empty when there are none), all of which the whole-layer op
    computes exactly (:meth:`FusedCheckpointedBlock._lora_spec`); ``(None, reason)`` otherwise."""
    w = block.block_ffn._ffn_tensors()[2]
    got, why = block._lora_spec(torch.empty((), dtype=w.dtype, device="meta"))
    if got is None:
        return None, f"{why} (the fused parts run on their own)"
    names = []
    for part_name in (row.attn, row.mlp):
        part = block._modules[part_name]
        rec = part.__dict__.get("_fused_children") or {}
        names += [f"{part_name}.{n}" for n, base in rec.items() if part._modules.get(n) is not base]
    return names, None


def _same_as_hf(block: FusedHFDecoderLayer, layer: nn.Module) -> Optional[str]:
    """None when the original layer's forward (on the fused parts) equals the block's."""
    w = block.block_ffn._ffn_tensors()[2]
    d = block.block_ffn.d_model
    x = torch.randn(1, 3, d, generator=torch.Generator().manual_seed(0)).to(device=w.device, dtype=w.dtype)
    pos = torch.arange(3, device=w.device)[None]
    was_training = layer.training
    layer.eval()  # dropouts off: the probe compares the math (the children are shared with the block)
    block.eval()
    try:
        with torch.no_grad():
            want = type(layer).forward(layer, x, attention_mask=None, position_ids=pos,
                                       **{block._hf_cache_kw: None})
            block.__dict__["_hf_tuple"] = isinstance(want, tuple)  # transformers 4.x layers return (h, ...)
            want = want[0] if isinstance(want, tuple) else want
            got = block._full_recompute(x, None, None)  # the whole-block math itself
    except Exception as e:  # the layer's forward needs something the probe does not give
        return f"its forward could not be checked ({type(e).__name__}: {e})"
    finally:
        layer.train(was_training)
        block.train(was_training)
    tol = 1e-5 if w.dtype in (torch.float32, torch.float64) else 2e-2
    if not isinstance(want, torch.Tensor) or want.shape != got.shape or \
            not torch.allclose(got.float(), want.float(), rtol=tol, atol=tol):
        err = (got.float() - want.float()).abs().max().item() if isinstance(want, torch.Tensor) and \
            want.shape == got.shape else float("nan")
        return f"max difference {err:.2e} on a probe"
    return None


_CACHE_KEYS = ("cache", "past_key_values", "past_key_value", "layer_past")


def _cache_kw(forward) -> str:
    """The KV-cache keyword of a Hugging Face forward (transformers 5: ``cache``; 4.x:
    ``past_key_values`` or ``past_key_value``; GPT-NeoX layers: ``layer_past``)."""
    params = inspect.signature(forward).parameters
    return next((k for k in _CACHE_KEYS if k in params), "past_key_values")


_UNSUPPORTED = object()
_mask_cache: list = [None, None, None]  # (weakref to the last mask, its key-padding mask, the window)
_dead_cache: list = [None, None]      # (weakref to the last key-padding mask, its rows that see no key)
_pos_cache: list = [None, None]


def _key_padding(mask, B: int, S: int, window: Optional[int] = None):
    """None (causal only), a bool (B, S) key-padding mask, or _UNSUPPORTED.

    A 4-D Hugging Face mask (bool, True = attend; or additive float, 0 = attend) is accepted
    when it equals causal & key_padding exactly (& the sliding window ``i - window < j`` for a
    layer with one: the kernels apply the window themselves); the result is cached for the mask
    object and window (the layers of one kind receive the same mask)."""
    if mask is None:
        return None
    ref = _mask_cache[0]
    if ref is not None and ref() is mask and _mask_cache[2] == window:
        return _mask_cache[1]
    out = _UNSUPPORTED
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[-2:] == (S, S) \
            and mask.shape[0] in (1, B):
        vis = mask[:, 0] if mask.dtype == torch.bool else mask[:, 0] > torch.finfo(mask.dtype).min / 2
        keys = vis.diagonal(dim1=-2, dim2=-1).expand(B, S)  # key j is visible from query j unless padded
        causal = torch.ones(S, S, dtype=torch.bool, device=mask.device).tril()
        if window is not None:
            causal = causal.triu(1 - window)
        if torch.equal(vis.expand(B, S, S), causal[None] & keys[:, None, :]):
            out = None if bool(keys.all()) else keys.contiguous()
    _mask_cache[0], _mask_cache[1] = weakref.ref(mask) if isinstance(mask, torch.Tensor) else None, out
    _mask_cache[2] = window
    return out


def _rotate_half(t: torch.Tensor) -> torch.Tensor:
    h = t.shape[-1] // 2
    return torch.cat((-t[..., h:], t[..., :h]), dim=-1)


def _rope_tables(theta: float, D: int, pos, S: int, x: torch.Tensor):
    """(cos, sin) ``(batch or 1, S, D)`` as Hugging Face's default rotary embedding computes them
    (fp32 angles, then the input dtype)."""
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float, device=x.device) / D))
    p = torch.arange(S, device=x.device)[None] if pos is None else (pos if pos.dim() == 2 else pos[None])
    emb = (p[..., None].float() * inv).repeat(1, 1, 2)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _positions(position_ids, B: int, S: int):
    """None when ``position_ids`` is the default 0..S-1 (nothing to save), else the ids."""
    if position_ids is None:
        return None
    ref = _pos_cache[0]
    if ref is not None and ref() is position_ids:
        return _pos_cache[1]
    default = torch.arange(S, device=position_ids.device)
    out = None if position_ids.shape[-1] == S and bool((position_ids == default).all()) else position_ids
    _pos_cache[0], _pos_cache[1] = weakref.ref(position_ids), out
    return out


# ============================================================================ detection
def _config_activation(cfg) -> Optional[str]:
    for key in ("hidden_activation", "hidden_act", "activation_function"):
        v = getattr(cfg, key, None)
        if isinstance(v, str):
            return v
    return None


def _mlp_layout(m: nn.Module) -> Optional[str]:
    has = lambda *n: all(hasattr(m, x) for x in n)  # noqa: E731
    if has("gate_proj", "up_proj", "down_proj"):
        return "gated"
    if has("gate_up_proj", "down_proj"):
        return "packed_gated"
    if has("c_fc", "c_proj") and not hasattr(m, "c_attn"):
        return "gpt2"
    if has("fc1", "fc2") or has("dense_h_to_4h", "dense_4h_to_h"):
        return "fc"
    return None


def _is_attention(m: nn.Module) -> bool:
    return any(hasattr(m, n) for n in ("q_proj", "qkv_proj", "c_attn", "Wqkv", "query_key_value"))


def _sliding_window(attn: nn.Module, cfg) -> Optional[int]:
    """The attention's sliding window (keys within ``window`` positions of the query), or None.
    The attention's own ``sliding_window`` attribute when it has one (None: a full-attention
    layer); otherwise the config's ``sliding_window`` (Mistral, Starcoder2 read it in forward):
    the fused path runs only up to it, where attention is exactly causal."""
    if hasattr(attn, "sliding_window"):
        window = attn.sliding_window
    else:
        window = getattr(cfg, "sliding_window", None)
    return int(window) if window else None


# ============================================================================ config fields
_NONE_OR_ZERO = (None, 0, 0.0, False)


@dataclass(frozen=True)
class _Field:
    """How one config field enters the math of what :func:`patch_hf_model` replaces.

    ``scope``: "attention" (the field gates the fused attention), "layer" (it gates the
    whole-layer block), "checked" (the math is read from the module and checked by evaluation
    when converting it), "model" (applied by Hugging Face's code outside the replaced modules,
    which keeps running). ``exact``: the values the fused path computes exactly (a tuple of
    values, a predicate ``(value, module) -> bool``, or None for every value). ``math``: what the
    field does, for the refusal reason.
    """

    scope: str
    math: str
    exact: object = None

    def accepts(self, value, module) -> bool:
        if self.exact is None:
            return True
        if callable(self.exact):
            return bool(self.exact(value, module))
        return any(value is v or (type(value) is not bool and value == v) for v in self.exact)


def _default_rope(value, attn) -> bool:
    """``rope_parameters`` (5.x) / ``rope_scaling`` (4.x): the default rotary embedding (no
    scaling type; a partial factor is computed exactly). Per-layer-type parameters (Gemma 3):
    the attention's own layer type's entry (every entry when the module names none)."""
    if not value:
        return True
    if not isinstance(value, dict):
        return False
    if "rope_theta" not in value and not any(k in value for k in ("rope_type", "type")):
        own = getattr(attn, "layer_type", None)
        entries = [value[own]] if own in value else list(value.values())
        return bool(entries) and all(isinstance(e, dict) and _default_rope(e, attn) for e in entries)
    return value.get("rope_type", value.get("type", "default")) == "default"


_A, _L, _C, _M = "attention", "layer", "checked", "model"
_SHAPE = "read from the projections' weights"
_BIAS = "each projection's bias is copied as is"
_SCALING = "enters through the attention's `scaling`, which the fused attention uses"
_WINDOW = "the attention's sliding window is the fused kernels' window mask (at every length)"
_NORM = "norms are replaced only when evaluating them matches (eps read from the module)"
_ACT = "the MLP is replaced only when the activation it computes matches the config's"
_OUTSIDE = "applied by Hugging Face's model code outside the replaced modules"

# Every config field the attention, rotary-embedding and decoder-layer code of a family reads
# must be a row here; a field read but not listed makes that part be left alone (see
# _config_refusal), so a new transformers field is never silently ignored.
_FIELDS = {
    # --- attention: shapes, biases, scaling
    "hidden_size": _Field(_A, _SHAPE), "num_attention_heads": _Field(_A, _SHAPE),
    "num_key_value_heads": _Field(_A, _SHAPE), "head_dim": _Field(_A, _SHAPE),
    "attention_bias": _Field(_A, _BIAS), "qkv_bias": _Field(_A, _BIAS), "use_qkv_bias": _Field(_A, _BIAS),
    "use_bias": _Field(_A, _BIAS), "attention_out_bias": _Field(_A, _BIAS),
    "attention_multiplier": _Field(_A, _SCALING), "query_pre_attn_scalar": _Field(_A, _SCALING),
    # --- attention: rotary embedding
    "rope_parameters": _Field(_A, "a rotary embedding other than the default full one", _default_rope),
    "rope_scaling": _Field(_A, "a rotary embedding other than the default full one", _default_rope),
    "rope_theta": _Field(_A, "the rotary base, read by the fused attention"),
    "partial_rotary_factor": _Field(_A, "partial rotary embedding: the op's rotary_dim = int(head_dim * factor)"),
    "rotary_pct": _Field(_A, "partial rotary embedding: the op's rotary_dim = int(head_dim * rotary_pct)"),
    # GPT-2: the attention's `scaling` holds both; fp32 scores and softmax are what the kernels compute
    "scale_attn_weights": _Field(_A, _SCALING), "scale_attn_by_inverse_layer_idx": _Field(_A, _SCALING),
    "reorder_and_upcast_attn": _Field(_A, "fp32 scores and softmax (the fused kernels' own precision)"),
    "rotary_dim": _Field(_A, "partial rotary embedding",
                         lambda v, m: v is None or v == getattr(m, "head_dim", None)),
    "no_rope_layers": _Field(_A, "layers without rotary embedding", lambda v, m: v is None or all(v)),
    "max_position_embeddings": _Field(_A, "read only by rope scaling types, which are refused"),
    # --- attention: math the fused kernels do not have
    "clip_qkv": _Field(_A, "clamping of q, k and v to [-clip_qkv, clip_qkv]", (None,)),
    "attn_logit_softcapping": _Field(_A, "tanh soft-capping of the attention logits: the attention's "
                                     "attn_logit_softcapping is the fused op's softcap (after the scaling, before "
                                     "the masks, as Hugging Face)"),
    "use_qk_norm": _Field(_A, "QK-norm", (None, False)),
    "qk_layernorm": _Field(_A, "QK-norm", (None, False)),
    "attention_dropout": _Field(_A, "dropout on the attention probabilities", _NONE_OR_ZERO),
    "attn_pdrop": _Field(_C, "dropout on the attention probabilities: GPT-2's attn_dropout, the fused op's "
                         "dropout_p (its p read at each call, training mode; masks replayed)"),
    "residual_dropout": _Field(_A, "dropout on the attention output", _NONE_OR_ZERO),
    "use_bidirectional_attention": _Field(_A, "bidirectional (non-causal) attention", (None, False)),
    "_attn_implementation": _Field(_A, "this attention implementation",
                                   (None, "eager", "sdpa", "flash_attention_2")),
    # --- attention: sliding windows
    "sliding_window": _Field(_A, _WINDOW), "use_sliding_window": _Field(_A, _WINDOW),
    "max_window_layers": _Field(_A, _WINDOW), "sliding_window_pattern": _Field(_A, _WINDOW),
    "layer_types": _Field(_A, "layer types other than full and sliding-window attention",
                          lambda v, m: v is None or set(v) <= {"full_attention", "sliding_attention"}),
    # --- decoder layer (whole-layer blocks; the layer's own code runs otherwise)
    "residual_multiplier": _Field(_L, "scaling of the residual branches", (None, 1.0)),
    "hidden_dropout": _Field(_C, "dropout on the residual branches: the layer's Dropout modules, replayed"),
    "resid_pdrop": _Field(_C, "dropout on the residual branches: the Dropout modules where they live (GPT-2's "
                          "attention resid_dropout and MLP dropout, Phi-3's layer dropouts), replayed; another "
                          "Dropout child with p > 0 is refused"),
    "use_parallel_residual": _Field(_C, "the parallel attention/MLP residual (GPT-NeoX): the layer's placement "
                                    "is the one its forward agrees with on a probe"),
    "intermediate_size": _Field(_L, "read from the MLP's weights"), "n_inner": _Field(_L, "read from the MLP's weights"),
    "add_cross_attention": _Field(_L, "cross-attention inside the layer (GPT-2 as a decoder of an encoder)",
                                  (None, False)),
    # --- checked by evaluation when converting norms and MLPs
    "rms_norm_eps": _Field(_C, _NORM), "layer_norm_eps": _Field(_C, _NORM), "norm_eps": _Field(_C, _NORM),
    "norm_epsilon": _Field(_C, _NORM), "layer_norm_epsilon": _Field(_C, _NORM),
    "hidden_act": _Field(_C, _ACT), "hidden_activation": _Field(_C, _ACT), "activation_function": _Field(_C, _ACT),
    "mlp_bias": _Field(_C, "the MLP's biases are read from its modules"),
    # --- outside the replaced modules
    "embedding_multiplier": _Field(_M, _OUTSIDE), "logits_scaling": _Field(_M, _OUTSIDE),
    "final_logit_softcapping": _Field(_M, _OUTSIDE), "logit_scale": _Field(_M, _OUTSIDE),
    "tie_word_embeddings": _Field(_M, _OUTSIDE), "vocab_size": _Field(_M, _OUTSIDE),
}

_CONFIG_READ = __import__("re").compile(r"config\.(\w+)|getattr\(\s*(?:self\.)?config\s*,\s*[\"'](\w+)")
_read_cache: dict = {}


def _fields_read(cls) -> Optional[frozenset]:
    """The config fields a class's source reads (``config.x``, ``getattr(config, "x", ...)``), or
    None when its source cannot be read."""
    if cls not in _read_cache:
        try:
            src = inspect.getsource(cls)
        except (OSError, TypeError):
            _read_cache[cls] = None
        else:
            _read_cache[cls] = frozenset(a or b for a, b in _CONFIG_READ.findall(src))
    return _read_cache[cls]


def _own_classes(module: nn.Module) -> list:
    """The classes of ``module``'s MRO whose code can read a config (not torch's, not ours)."""
    return [c for c in type(module).__mro__
            if c.__module__.split(".")[0] not in ("torch", "builtins", "fused_ckpt", "typing")]


def _config_refusal(cfg, module: nn.Module, scope: str, classes: list) -> Optional[str]:
    """Why the fused replacement of ``module`` (scope "attention" or "layer") would not compute
    what ``cfg`` asks for, or None. A known field with a value outside what the fused path
    computes exactly, or a field that ``classes``' code reads and the table does not know,
    are refused, naming the field."""
    if cfg is None:
        return None
    for name, rule in _FIELDS.items():
        if rule.scope == scope and rule.exact is not None and hasattr(cfg, name):
            value = getattr(cfg, name)
            if not rule.accepts(value, module):
                return f"config {name}={value!r}: {rule.math} is not computed by the fused path"
    for cls in classes:
        read = _fields_read(cls)
        if read is None:
            return f"the source of {cls.__name__} cannot be read to list the config fields it uses"
        unknown = sorted(n for n in read if n not in _FIELDS and not callable(getattr(cfg, n, None)))
        if unknown:
            return (f"config field(s) {', '.join(unknown)} read by {cls.__name__} are not in fused_ckpt's "
                    "table of fields (integrations/hf.py _FIELDS): left alone rather than ignored")
    return None


# the attention's nn.Dropout children the fused op computes (GPT-2): on the probabilities, on the output
_FUSED_DROPOUTS = ("attn_dropout", "resid_dropout")


def _attention_refusal(attn: nn.Module, cfg, rotaries=()) -> Optional[str]:
    row = hf_projection_layout(attn)
    if row is None:
        packed = next((n for n in ("Wqkv", "qkv", "in_proj") if hasattr(attn, n)), None)
        return ((f"packed {packed} projection: no exact fused mapping" if packed else "no projection layout")
                + " (fused_ckpt knows q_proj/k_proj/v_proj/o_proj, qkv_proj/o_proj, c_attn/c_proj Conv1D, "
                "query_key_value/dense)")
    if getattr(attn, "config", None) is None:
        return "no config on the attention module"
    known = set(row[0]) | {row[1], "q_norm", "k_norm", "rotary_emb"}
    for name, child in attn.named_children():
        if isinstance(child, nn.Dropout):
            # GPT-2's dropouts on the probabilities and the output are the fused op's (read at each call)
            if child.p > 0 and not (row[0] == ("c_attn",) and name in _FUSED_DROPOUTS and type(child) is nn.Dropout):
                return (f"{name} is a dropout with p={child.p}, which the fused attention does not compute "
                        "(set the config's dropout to 0)")
        elif name not in known:
            return f"submodule {name} ({type(child).__name__}) is not part of an attention layout fused_ckpt computes"
    classes = _own_classes(attn) + [c for r in rotaries for c in _own_classes(r)]
    return _config_refusal(attn.config, attn, _A, classes)


def _accepts(forward, name: str) -> bool:
    return name in inspect.signature(forward).parameters


def _probe_attention(attn: nn.Module, rotaries: list) -> Optional[str]:
    """None when the fused attention built from ``attn`` computes what ``attn`` computes on a
    probe (float64 copies, causal mask, shifted positions, the model's rotary embedding, Hugging
    Face's eager implementation), else the reason. Catches what no config field says (an
    interleaved rotary convention, a forward that rescales its output, ...)."""
    import copy

    w = next(attn.parameters(), None)
    if w is None or w.is_meta:
        return None  # nothing to evaluate: the config table alone decides
    try:
        ref = copy.deepcopy(attn).double().eval()  # the math: no dropout
        ref.config = copy.deepcopy(ref.config)
        ref.config._attn_implementation = "eager"  # the copy's own config
        new = FusedHFAttention.from_hf(ref, backend="aten")
        if new.rope_theta is not None and len(rotaries) != 1:
            return f"{len(rotaries)} rotary embedding modules in the model: cannot tell which feeds this attention"
        S = 5
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, S, new.d_model, generator=gen, dtype=torch.float64).to(w.device)
        pos = (torch.arange(S) + 3)[None].to(w.device)
        mask = torch.full((S, S), torch.finfo(torch.float64).min, dtype=torch.float64, device=w.device)
        mask = mask.triu(1)
        if new.window is not None:  # what Hugging Face's sliding mask hides (the fused kernels' window)
            mask = mask + torch.full_like(mask, torch.finfo(torch.float64).min).tril(-new.window)
        mask = mask[None, None]
        hf_forward = type(attn).forward
        kw = {_cache_kw(hf_forward): None}
        with torch.no_grad():
            if new.rope_theta is not None:
                rot = rotaries[0]
                extra = {"layer_type": attn.layer_type} if _accepts(type(rot).forward, "layer_type") else {}
                kw["position_embeddings"] = rot(x, pos, **extra)
            want = hf_forward(ref, x, attention_mask=mask, **kw)
            want = want[0] if isinstance(want, tuple) else want
            got = FusedCheckpointedAttention.forward(new, x, position_ids=pos if new.rope_theta is not None else None)
    except Exception as e:  # the probe call does not fit this attention
        return f"its forward could not be checked against the fused attention ({type(e).__name__}: {e})"
    err = (got - want).abs().max().item()
    if not err <= 1e-6 * max(want.abs().max().item(), 1.0):
        return (f"Hugging Face's forward and the fused attention differ on a float64 probe (max error {err:.2e}): "
                "the module computes something the config does not describe")
    return None


# ============================================================================ report
@dataclass
class PatchReport:
    """What :func:`patch_hf_model` did: ``replaced`` and ``left_alone`` rows are
    ``(qualified name, class name, detail or reason)``; ``plan`` is the applied policy's plan;
    ``loss_head`` is ``(qualified name of the LM head, fused?, detail or the reason it was not)``,
    or None when ``fused_loss=False`` or the model has no causal-LM head."""

    replaced: list = field(default_factory=list)
    left_alone: list = field(default_factory=list)
    hf_checkpointing_disabled: list = field(default_factory=list)
    plan: Optional[CheckpointPlan] = None
    loss_head: Optional[tuple] = None

    def __str__(self) -> str:
        lines = [f"fused_ckpt.patch_hf_model: {len(self.replaced)} module(s) replaced, "
                 f"{len(self.left_alone)} left alone"]
        lines += [f"  replaced   {n} ({c}) -> {d}" for n, c, d in self.replaced]
        lines += [f"  left alone {n} ({c}): {r}" for n, c, r in self.left_alone]
        if self.hf_checkpointing_disabled:
            lines.append(f"  Hugging Face checkpointing switched off on {len(self.hf_checkpointing_disabled)} "
                         "layer(s); fused_ckpt sets their recompute")
        if self.loss_head is not None:
            n, fused, d = self.loss_head
            lines.append(f"  loss head  {n} -> {d}" if fused else f"  loss head  {n}: not fused: {d}")
        if self.plan is not None:
            lines.append(str(self.plan))
        return "\n".join(lines)


# ============================================================================ patching
# The norm kinds patch_hf_model adopts: (report detail, fp32 math of the candidate, how to build it).
# Each candidate is evaluated against the module on probe rows; the first that matches is taken.
def _rms(offset):
    return lambda x, w, b, eps: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (w.float() + offset)


_NORM_KINDS = (
    ("FusedRMSNorm", _rms(0.0), "rms", 0.0),                 # Llama, Mistral, Qwen2/3, Phi-3, OLMo2
    ("FusedRMSNorm (1 + w)", _rms(1.0), "rms", 1.0),         # Gemma, Gemma2, Gemma3
    ("FusedLayerNorm", lambda x, w, b, eps: nn.functional.layer_norm(  # GPT-2, GPT-NeoX (with bias)
        x, x.shape[-1:], w.float(), None if b is None else b.float(), eps), "ln", 0.0),
)


def _convert_norm(m: nn.Module, backend: str):
    """``(fused norm, detail)`` for a norm module that computes one of ``_NORM_KINDS``: Llama's
    RMSNorm ``w * x * rsqrt(mean(x^2) + eps)``, Gemma's ``(1 + w)`` RMSNorm, or LayerNorm (with or
    without bias), identified by evaluating the module in fp32 on probe rows (not by its class),
    or ``(None, reason)``. The fused norm holds the module's own ``weight`` / ``bias`` Parameters."""
    w = getattr(m, "weight", None)
    b = getattr(m, "bias", None)
    eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or not isinstance(eps, float):
        return None, "no 1-D weight and float eps / variance_epsilon (not a norm fused_ckpt knows)"
    if w.is_meta:
        return None, "meta weights: the norm cannot be identified by evaluating it"
    if b is not None and (not isinstance(b, torch.Tensor) or b.shape != w.shape):
        return None, "its bias is not a tensor of the weight's shape"
    d = w.shape[0]
    gen = torch.Generator().manual_seed(0)
    probe = (torch.randn(3, d, generator=gen) * 2 + 0.5).to(w.device)
    with torch.no_grad():
        m32 = _float_copy(m)
        try:
            got = m32(probe)
        except Exception as e:  # noqa: BLE001 (the probe call does not fit this module)
            return None, f"its forward could not be evaluated ({type(e).__name__}: {e})"
        for detail, math, kind, offset in _NORM_KINDS:
            if kind == "rms" and b is not None:
                continue
            want = math(probe, m32.weight, getattr(m32, "bias", None), eps)
            if got.shape == want.shape and torch.allclose(got.float(), want, rtol=1e-5, atol=1e-6):
                break
        else:
            return None, ("computes none of Llama's RMSNorm, Gemma's (1 + w) RMSNorm or LayerNorm on a probe "
                          f"(eps {eps})")
    if kind == "rms":
        new = FusedRMSNorm(d, eps, device="meta", dtype=w.dtype, backend=backend, offset=offset)
        new.weight = w  # the same Parameter object (the meta placeholder is dropped)
    else:
        new = FusedLayerNorm(d, eps, device="meta", dtype=w.dtype, backend=backend, bias=b is not None)
        new.weight, new.bias = w, b
    new.train(m.training)
    return new, detail


def _float_copy(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m).float()


def patch_hf_model(model: nn.Module, policy="full", *, mlp: bool = True, attention: bool = True,
                   norm: bool = True, blocks: bool = True, fused_loss: bool = True, backend: str = "auto",
                   tokens: Optional[int] = None, batch: Optional[int] = None, seq: Optional[int] = None) -> PatchReport:
    """Replace the MLPs (and exactly-mapping attentions) of a built Hugging Face model in place.

    Args:
        policy: applied afterwards with :func:`fused_ckpt.apply_checkpointing` ("full" by
            default; None leaves the modules' default dials and no checkpoint wrappers).
        mlp, attention: which kinds to replace.
        norm: replace Llama-style RMSNorms (every one in the model, the final norm included) by
            :class:`FusedRMSNorm`, which keeps x and a per-row fp32 rstd for backward instead of
            Hugging Face's fp32 copy of its input (same ``weight`` parameter name).
        blocks: then replace each decoder layer whose four parts (input_layernorm, self_attn,
            post_attention_layernorm, mlp) all became fused modules, and whose forward is the
            Llama pre-norm layout (checked by evaluation), by a :class:`FusedHFDecoderLayer` (a
            :class:`FusedCheckpointedBlock`): policies can then recompute the whole layer from its
            input ("full": the input and per-row norm statistics kept, as little as Hugging Face
            checkpointing keeps). Parameter names do not change.
        fused_loss: make a causal LM (``lm_head`` an ``nn.Linear``, Hugging Face's
            ``ForCausalLMLoss``) compute its loss, when called with ``labels``, through
            :func:`fused_ckpt.fused_linear_cross_entropy` from the base model's last hidden state:
            the ``[tokens, vocab]`` logits are not materialised and the output's ``logits`` is
            None (backward keeps the hidden state, one fp32 log-sum-exp and the label per token).
            Same loss as Hugging Face's: labels shifted by one (or ``shift_labels``),
            ``ignore_index``, ``num_items_in_batch`` (sum / num_items), Gemma-2's
            ``final_logit_softcapping``, tied embeddings (the head's weight is read where it
            lives), ``logits_to_keep``. Calls without labels (and ``generate()``) run Hugging
            Face's forward unchanged. To get logits with labels: pass ``return_logits=True`` to
            the call, or set ``model.fused_ckpt_return_logits = True`` (e.g. for a Trainer
            evaluation with ``compute_metrics``); both run Hugging Face's own head and loss.
            A head computing something else (Granite's ``logits_scaling``, Cohere's
            ``logit_scale``, a router auxiliary loss, a quantized or non-Linear head, a custom
            loss function) is left alone with the reason in ``report.loss_head``;
            :func:`fused_loss_head` returns the fused head (a FusedLinearCrossEntropy sharing
            ``lm_head``'s parameters, not a registered submodule) or None.
        backend: the fused modules' backend ("auto", "triton", "aten").
        tokens / batch, seq: forwarded to ``apply_checkpointing`` (predictions; MemoryBudget).

    Returns a :class:`PatchReport`. Module docstring: detection rules, HF checkpointing interplay.
    """
    cfg = getattr(model, "config", None)
    _, layers = find_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    report = PatchReport()
    cfg_act = _config_activation(cfg) if cfg is not None else None
    rotaries = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    for layer in layers:
        lname = names[id(layer)]
        patched = False
        for cname, child in list(layer.named_children()):
            q = f"{lname}.{cname}"
            if isinstance(child, (FusedCheckpointedFFN, FusedCheckpointedAttention)):
                patched = True
                continue
            layout = _mlp_layout(child)
            if layout is not None:
                if not mlp:
                    report.left_alone.append((q, type(child).__name__, "mlp=False"))
                    continue
                new, why = _convert_mlp(child, layout, cfg_act, backend)
            elif _is_attention(child):
                if not attention:
                    report.left_alone.append((q, type(child).__name__, "attention=False"))
                    continue
                new, why = _convert_attention(child, cfg, backend, rotaries)
            else:
                continue
            if new is None:
                report.left_alone.append((q, type(child).__name__, why))
                continue
            setattr(layer, cname, new)
            new.__dict__["_fused_qualname"] = q  # named in the warning of a later unfused fallback
            report.replaced.append((q, type(child).__name__, f"{type(new).__name__}: {why}"))
            patched = True
        if patched and install_hf_guard(layer):
            report.hf_checkpointing_disabled.append(lname)
    if norm:
        for qname, child in list(model.named_modules()):
            if isinstance(child, (FusedRMSNorm, FusedLayerNorm)) or "norm" not in type(child).__name__.lower():
                continue
            parent_name, _, cname = qname.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if isinstance(parent, FusedCheckpointedAttention):
                continue  # QK-norms: the fused attention reads their weights itself
            new, detail = _convert_norm(child, backend)
            if new is None:
                report.left_alone.append((qname, type(child).__name__, f"norm not fused: {detail}"))
                continue
            setattr(parent, cname, new)
            report.replaced.append((qname, type(child).__name__, detail))
    if blocks:
        layers = [_convert_layer(model, layer, names[id(layer)], backend, report) for layer in layers]
    if fused_loss and isinstance(getattr(model, "lm_head", None), nn.Module):
        fused, detail = _patch_loss_head(model, backend)
        report.loss_head = (names.get(id(model.lm_head), "lm_head"), fused, detail)
    if policy is not None:
        report.plan = apply_checkpointing(model, policy, tokens=tokens, batch=batch, seq=seq, layers=layers)
    return report


def _convert_layer(model: nn.Module, layer: nn.Module, qname: str, backend: str, report: PatchReport) -> nn.Module:
    """Replace ``layer`` by a :class:`FusedHFDecoderLayer` when it converts; returns the layer in place."""
    if isinstance(layer, FusedCheckpointedBlock):
        return layer
    # fused parts holding PEFT LoRA wrappers: whole when the block op computes them (FusedHFDecoderLayer.from_hf)
    new, why = FusedHFDecoderLayer.from_hf(layer, backend)
    if new is None:
        report.left_alone.append((qname, type(layer).__name__, f"not a whole fused block: {why}"))
        return layer
    for hook in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
        # the HF-checkpointing guard is re-installed below; any other hook would be lost silently
        others = [h for h in getattr(layer, hook).values() if h is not _hf_gc_guard]
        if others:
            report.left_alone.append((qname, type(layer).__name__, f"not a whole fused block: it has {hook} "
                                      "(patch before wrapping or hooking the model)"))
            return layer
    parent_name, _, cname = qname.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, cname, new)
    new.__dict__["_fused_qualname"] = qname
    install_hf_guard(new)
    report.replaced.append((qname, type(layer).__name__, why))
    return new


def _convert_mlp(child, layout, cfg_act, backend):
    from .peft import lora_wrappers, projection_refusal

    # PEFT lora.Linear children (vanilla LoRA on a plain base): the fused FFN is built on their base
    # layers and then holds the wrappers, whose low-rank terms it computes in the op (ops/ffn_lora.py)
    wrapped, why = lora_wrappers(child)
    why = why if why is not None else projection_refusal(
        child, [n for n, _ in child.named_children() if n not in wrapped])
    if why is not None:  # other wrappers, quantized linears: their weight is not their math
        return None, why
    for name, w in wrapped.items():
        child._modules[name] = w.base_layer
    try:
        new = FusedCheckpointedFFN.from_module(child, backend=backend, share_parameters=True)
    except ValueError as e:
        return None, str(e)
    finally:
        for name, w in wrapped.items():
            child._modules[name] = w
    for name, w in wrapped.items():  # same key, same place in the module order
        new._modules[name] = w
    for k, v in child.__dict__.items():  # config, hidden_size, ... (as the attention keeps them)
        if not k.startswith("_") and k != "training" and k not in new.__dict__ \
                and not isinstance(v, (nn.Module, torch.Tensor)):
            new.__dict__[k] = v
    base = _FUSED_BASE.get(new.activation, new.activation)
    gated = new.activation in _FUSED_BASE
    if (layout in ("gated", "packed_gated")) != gated:
        return None, f"layout {layout} does not match activation {new.activation}"
    if cfg_act is not None:
        want = _HF_ACT_BASE.get(cfg_act)
        if want is None:
            return None, f"config activation {cfg_act!r} is not one fused_ckpt knows"
        if want != base:
            return None, f"config activation {cfg_act!r} ({want}) differs from what the module computes ({base})"
    new._fused_ckpt_hf_layout = layout
    lora = f", PEFT LoRA on {', '.join(wrapped)} computed in the fused op" if wrapped else ""
    return new, f"activation {new.activation}, layout {layout}{lora}"


def _convert_attention(child, cfg, backend, rotaries=()):
    from .peft import lora_wrappers, projection_refusal

    # PEFT lora.Linear projections (vanilla LoRA on a plain base): the fused attention is built and probed on
    # their base layers, then holds the wrappers, whose low-rank terms it computes in the op (ops/attn_lora.py)
    wrapped, why = lora_wrappers(child)
    # other wrappers, quantized linears: their weight is not their math
    why = why if why is not None else projection_refusal(child, [n for n in child._modules if n not in wrapped])
    if why is not None:
        return None, why
    for name, w in wrapped.items():
        child._modules[name] = w.base_layer
    try:
        new, why = _build_attention(child, cfg, backend, rotaries)
    finally:
        for name, w in wrapped.items():
            child._modules[name] = w
    if new is None:
        return None, why
    for name, w in wrapped.items():  # same key, same place in the module order
        new._modules[name] = w
    if wrapped:
        why += f", PEFT LoRA on {', '.join(wrapped)} computed in the fused op"
    return new, why


def _build_attention(child, cfg, backend, rotaries=()):
    """(the fused attention of ``child``, its features for the report) or (None, the reason)."""
    why = _attention_refusal(child, cfg, rotaries)
    if why is not None:
        return None, why
    try:
        new = FusedHFAttention.from_hf(child, backend=backend)
    except ValueError as e:
        return None, str(e)
    why = _probe_attention(child, list(rotaries))
    if why is not None:
        return None, why
    window = new.window
    feats = [f"heads {new.n_heads}/{new.n_kv_heads}", f"head_dim {new.head_dim}", f"rope_theta {new.rope_theta}"]
    if new.rotary_dim is not None:
        feats.append(f"rotary_dim {new.rotary_dim}")
    if new.qkv_layout != "separate":
        feats.append(f"packed {new._qkv_names[0]} ({new.qkv_layout})")
    if "q_norm" in new._modules:
        per_head = new._modules["q_norm"].weight.shape[0] == new.head_dim
        feats.append(f"QK-norm {'per head' if per_head else 'over the projection'}"
                     + (" (1 + w)" if new.qk_norm_offset else ""))
    if window:
        feats.append(f"sliding window {window}")
    if new.softcap:
        feats.append(f"logit softcap {new.softcap:g}")
    drops = [f"{n} {new._modules[n].p:g}" for n in _FUSED_DROPOUTS
             if isinstance(new._modules.get(n), nn.Dropout) and new._modules[n].p > 0]
    if drops:
        feats.append(f"dropout ({', '.join(drops)}; replayed, training mode)")
    return new, ", ".join(feats)


# ============================================================================ causal-LM loss head
# Config fields a *ForCausalLM forward may read, and how the fused loss treats them. A field the
# forward reads that is not here makes the head be left alone (e.g. Mixtral's router auxiliary
# loss: router_aux_loss_coef), like _FIELDS for the layers.
_HEAD_FIELDS = {
    "vocab_size": _Field(_M, "read from the head's weight"),
    "hidden_size": _Field(_M, "read from the head's weight"),
    "tie_word_embeddings": _Field(_M, "the head's weight Parameter is read where it lives (tied or not)"),
    "final_logit_softcapping": _Field(_M, "Gemma-2 soft-capping, the fused op's softcap"),
    "use_return_dict": _Field(_M, "the output format (the same class, logits None)"),
    "return_dict": _Field(_M, "the output format (the same class, logits None)"),
    "output_hidden_states": _Field(_M, "passed to the base model as is"),
    "output_attentions": _Field(_M, "passed to the base model as is"),
    "use_cache": _Field(_M, "passed to the base model as is"),
    "logits_scaling": _Field(_M, "division of the logits by logits_scaling (Granite)", (None, 1, 1.0)),
    "logit_scale": _Field(_M, "multiplication of the logits by logit_scale (Cohere)", (None, 1, 1.0)),
}


def fused_loss_head(model: nn.Module):
    """The :class:`~fused_ckpt.FusedLinearCrossEntropy` through which a patched causal-LM
    computes its loss (sharing ``lm_head``'s Parameters; not a registered submodule, so module
    names and the state dict are unchanged), or None when the loss is not fused."""
    return model.__dict__.get("_fused_ckpt_loss_head")


def _head_refusal(model: nn.Module) -> Optional[str]:
    """Why the loss of ``model`` cannot be computed by the fused linear cross-entropy, or None."""
    if "forward" in model.__dict__:
        return "the model's forward is already wrapped on the instance (patch before wrapping it)"
    forward = type(model).forward
    params = inspect.signature(forward).parameters
    missing = [p for p in ("labels", "logits_to_keep") if p not in params]
    if missing:
        return f"its forward has no {'/'.join(missing)} argument (not a Hugging Face causal-LM forward)"
    head = getattr(model, "lm_head", None)
    if type(head) is not nn.Linear:
        return (f"lm_head is a {type(head).__name__}, not an nn.Linear (quantized, adapted or custom heads "
                "compute something else)" if head is not None else "no lm_head")
    for name, p in (("weight", head.weight), ("bias", head.bias)):
        if p is not None and (type(p) is not nn.Parameter or not p.dtype.is_floating_point):
            return f"lm_head.{name} is a {type(p).__name__} of {p.dtype} (quantized or distributed weights)"
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        return "no base model (base_model_prefix) to take the hidden states from"
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
        loss_fn = model.loss_function
    except Exception as e:  # noqa: BLE001 (an older or unusual transformers)
        return f"its loss function cannot be read ({type(e).__name__}: {e})"
    if loss_fn is not ForCausalLMLoss:
        return f"its loss function is {getattr(loss_fn, '__name__', loss_fn)!r}, not Hugging Face's ForCausalLMLoss"
    cfg = getattr(model, "config", None)
    for name, rule in _HEAD_FIELDS.items():
        if rule.exact is not None and cfg is not None and hasattr(cfg, name) and not rule.accepts(getattr(cfg, name), model):
            return f"config {name}={getattr(cfg, name)!r}: {rule.math} is not computed by the fused loss"
    src = _code_of(forward)
    if src is None:
        return f"the source of {type(model).__name__}.forward cannot be read to list the config fields it uses"
    unknown = sorted({a or b for a, b in _CONFIG_READ.findall(src)} - set(_HEAD_FIELDS))
    if unknown:
        return (f"config field(s) {', '.join(unknown)} read by {type(model).__name__}.forward are not in "
                "fused_ckpt's table of head fields (integrations/hf.py _HEAD_FIELDS): left alone rather than ignored")
    return None


def _code_of(fn) -> Optional[str]:
    """The code of ``fn`` without its docstring and comments (GPT-NeoX's docstring example sets
    ``config.is_decoder``, which the forward never reads), or None when the source cannot be
    read. Falls back to the raw source when it does not parse on its own."""
    import ast
    import textwrap

    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return None
    try:
        tree = ast.parse(textwrap.dedent(src))
    except SyntaxError:
        return src
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                    first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.unparse(tree)  # comments are not in the tree


def _slice_to_keep(h: torch.Tensor, keep) -> torch.Tensor:
    """Hugging Face's ``slice_logits_to_keep`` (int: the last ``keep`` positions, 0 all; 1-D
    tensor: these positions; 2-D: per-row positions, or a bool mask flattening the kept rows)."""
    if isinstance(keep, torch.Tensor) and keep.dim() == 2:
        if keep.dtype == torch.bool:
            return h[keep]
        return torch.take_along_dim(h, keep[..., None], dim=1)
    if isinstance(keep, int):
        keep = slice(-keep, None)
    return h[:, keep, :]


def _hf_causal_lm_loss(model: nn.Module, h: torch.Tensor, labels, kwargs: dict) -> torch.Tensor:
    """Hugging Face's ForCausalLMLoss of ``softcap(lm_head(h))`` through the fused linear
    cross-entropy: labels shifted by one (or ``shift_labels``), ``ignore_index``, mean over the
    non-ignored tokens, or the sum divided by ``num_items_in_batch`` when it is given."""
    from ..ops.linear_ce import fused_linear_cross_entropy

    fused = model.__dict__["_fused_ckpt_loss_head"]
    lm_head = model.lm_head
    if fused.weight is not lm_head.weight or fused.bias is not lm_head.bias:  # the head was replaced/resized
        fused.weight, fused.bias = lm_head.weight, lm_head.bias
    ignore_index = kwargs.get("ignore_index", -100)
    shift = kwargs.get("shift_labels")
    if shift is None:
        shift = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    num_items = kwargs.get("num_items_in_batch")
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return fused_linear_cross_entropy(
        h.reshape(-1, h.shape[-1]), fused.weight, shift.reshape(-1).to(h.device), fused.bias,
        ignore_index=ignore_index, reduction="mean" if num_items is None else "sum", softcap=softcap or None,
        num_items=num_items, recompute=fused.recompute, backend=fused.backend)


def _make_fused_loss_forward(hf_forward):
    """The instance forward of a patched causal LM: Hugging Face's forward unless labels are
    given; with labels, Hugging Face's forward with ``labels=None`` and no logits kept (the base
    model and everything around it run as is), the last hidden state taken from the base model's
    output, and the loss computed from it through the fused linear cross-entropy."""
    sig = inspect.signature(hf_forward)

    @functools.wraps(hf_forward)
    def forward(self, *args, **kwargs):
        return_logits = kwargs.pop("return_logits", False) or self.__dict__.get("fused_ckpt_return_logits", False)
        bound = sig.bind(self, *args, **kwargs)
        labels = bound.arguments.get("labels")
        if labels is None or return_logits or type(self.lm_head) is not nn.Linear:
            return hf_forward(self, *args, **kwargs)
        var_kw = next((n for n, p in sig.parameters.items() if p.kind is p.VAR_KEYWORD), None)
        loss_kwargs = dict(bound.arguments.get(var_kw, {})) if var_kw else {}
        keep = bound.arguments.get("logits_to_keep", 0)
        bound.arguments["labels"] = None
        bound.arguments["logits_to_keep"] = torch.empty(0, dtype=torch.long, device=self.lm_head.weight.device)
        captured = []

        def grab(_module, _inputs, output):
            captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

        handle = self.base_model.register_forward_hook(grab)
        try:
            out = hf_forward(*bound.args, **bound.kwargs)
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError("fused_ckpt: the base model was not called; cannot compute the fused loss")
        loss = _hf_causal_lm_loss(self, _slice_to_keep(captured[-1], keep), labels, loss_kwargs)
        if isinstance(out, tuple):  # return_dict=False: (loss, ...) without the (empty) logits
            return (loss,) + tuple(out[1:])
        rest = {k: v for k, v in out.items() if k not in ("loss", "logits")}
        return type(out)(loss=loss, logits=None, **rest)

    forward.__fused_ckpt_loss__ = True
    return forward


def _probe_head(model: nn.Module) -> Optional[str]:
    """None when the fused loss equals Hugging Face's loss on a short probe (and the logits
    Hugging Face returns are ``softcap(lm_head(h))``), else the reason. Runs the model itself
    (eval mode, no gradients) on 4 tokens; skipped for meta weights."""
    w = model.lm_head.weight
    if w.is_meta:
        return None
    V = w.shape[0]
    ids = torch.randint(0, V, (1, 4), generator=torch.Generator().manual_seed(0)).to(w.device)
    captured = []
    handle = model.base_model.register_forward_hook(
        lambda _m, _i, o: captured.append(o.last_hidden_state if hasattr(o, "last_hidden_state") else o[0]))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = type(model).forward(model, input_ids=ids, labels=ids, use_cache=False)
            h = captured[-1]
            z = nn.functional.linear(h, w, model.lm_head.bias)
            cap = getattr(model.config, "final_logit_softcapping", None)
            if cap:
                z = torch.tanh(z / cap) * cap
            got = _hf_causal_lm_loss(model, h, ids, {})
    except Exception as e:  # noqa: BLE001 (the probe call does not fit this model)
        return f"its forward could not be checked against the fused loss ({type(e).__name__}: {e})"
    finally:
        handle.remove()
        model.train(was_training)
    tol = 1e-5 if w.dtype in (torch.float32, torch.float64) else 2e-2
    logits = getattr(out, "logits", None)
    if logits is None or logits.shape != z.shape or not torch.allclose(logits.float(), z.float(), rtol=tol, atol=tol):
        return "its logits are not softcap(lm_head(last hidden state)) on a probe: the head computes something else"
    if out.loss is None or not torch.allclose(got.float(), out.loss.float(), rtol=tol, atol=tol):
        return (f"its loss differs from the fused ForCausalLMLoss on a probe ({float(out.loss):.6g} vs "
                f"{float(got):.6g}): the forward adds or changes something")
    return None


def _patch_loss_head(model: nn.Module, backend: str) -> tuple:
    """``(True, detail)`` after making ``model`` compute its loss through the fused linear
    cross-entropy, or ``(False, reason)``."""
    from ..modules.linear_ce import FusedLinearCrossEntropy

    if fused_loss_head(model) is not None:
        return True, "already fused"
    why = _head_refusal(model)
    if why is not None:
        return False, why
    head = FusedLinearCrossEntropy.from_linear(model.lm_head, backend=backend)
    model.__dict__["_fused_ckpt_loss_head"] = head  # not a submodule: names and state dict unchanged
    why = _probe_head(model)
    if why is not None:
        del model.__dict__["_fused_ckpt_loss_head"]
        return False, why
    model.__dict__["forward"] = types.MethodType(_make_fused_loss_forward(type(model).forward), model)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = emb is not None and getattr(emb, "weight", None) is model.lm_head.weight
    cap = getattr(model.config, "final_logit_softcapping", None)
    return True, ("fused linear cross-entropy when labels are passed (logits not materialised, returned as None; "
                  f"recompute=True{', softcap ' + str(cap) if cap else ''}"
                  f"{', tied to the input embedding' if tied else ''}"
                  f"{', bias' if model.lm_head.bias is not None else ''})")


# ============================================================================ state dicts
def hf_layout(model: nn.Module, tensors: dict) -> dict:
    """``{name: tensor}`` of a patched model in the original Hugging Face layout: patching keeps
    names and layout, so this is a copy of the dict (kept for code written against the earlier
    renaming layout)."""
    return dict(tensors)


def hf_state_dict(model: nn.Module) -> dict:
    """The patched model's state dict in the original Hugging Face layout, which is
    ``model.state_dict()`` itself (patching keeps names and layout); kept as an alias."""
    return model.state_dict()


__all__ = ["patch_hf_model", "PatchReport", "FusedHFAttention", "FusedHFDecoderLayer", "hf_state_dict", "hf_layout",
           "fused_loss_head"]
