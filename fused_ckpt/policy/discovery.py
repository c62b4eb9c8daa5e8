"""Model discovery: the repeated layer list of a model (:func:`find_layers`) and, per layer, its
dial-controlled sites with their options and predictions (:func:`build_layers` -> :class:`LayerSpec`
of :class:`Site`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from ..modules.attention import FusedCheckpointedAttention
from ..modules.block import FusedCheckpointedBlock, attention_lora_bytes
from ..modules.ffn import FusedCheckpointedFFN
from .dials import (ATTENTION_DIALS, FFN_DIALS, Option, _norm_dial, attention_recompute_flops, attention_saved_bytes,
                    block_full_option)

_FUSED_TYPES = (FusedCheckpointedFFN, FusedCheckpointedAttention)


@dataclass
class Site:
    """A dial-controlled unit of a layer: a fused module or a checkpointable module."""

    layer: int
    name: str                      # qualified module name (or a label for config-only plans)
    kind: str                      # "ffn" | "attention" | "checkpoint"
    role: str                      # "ffn" | "attention" | "layer" | "other" (used by Selective)
    options: dict                  # dial -> Option (dials of DIALS[kind])
    module: Optional[nn.Module] = None

    def option(self, dial) -> Option:
        return self.options[_norm_dial(self.kind, dial)]


@dataclass
class LayerSpec:
    """The sites of one layer, plus fixed bytes the policy does not control (planner only)."""

    index: int
    name: str
    sites: list
    fixed: list = field(default_factory=list)   # (label, bytes) pairs, always kept
    # whole-layer options replacing every site's dial: a FusedCheckpointedBlock's "full"
    # recompute (keeps x and the norm statistics); chosen as ``{layer name: Option.dial}``
    alternatives: list = field(default_factory=list)
    module: Optional[nn.Module] = None
    site_bytes: int = 0   # kept whenever the site dials govern (a block's two norms: input + stats)


def _count_fused(module: nn.Module) -> int:
    return sum(isinstance(m, _FUSED_TYPES) for m in module.modules())


def find_layers(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The model's repeated block list: ``(qualified name, blocks)``.

    Among the ``nn.ModuleList``/``nn.Sequential`` containers of the model, the one holding the
    most fused modules; when no container holds any, the longest one whose children share one
    class and carry parameters (Hugging Face ``model.layers``, GPT-2 ``transformer.h``)."""
    best, best_key = None, None
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.ModuleList, nn.Sequential)) or len(mod) == 0:
            continue
        children = list(mod)
        n_fused = sum(_count_fused(c) for c in children)
        repeated = len({type(c) for c in children}) == 1 and all(
            any(True for _ in c.parameters()) for c in children)
        if not n_fused and not repeated:
            continue
        key = (n_fused, repeated, len(children), -name.count("."))
        if best_key is None or key > best_key:
            best, best_key = (name, children), key
    if best is None:
        raise ValueError(f"no repeated block list found in {type(model).__name__}: expected an nn.ModuleList "
                         "(or nn.Sequential) of transformer blocks; pass layers=[...] explicitly")
    return best


def _role(name: str) -> str:
    low = name.lower()
    if "attn" in low or "attention" in low:
        return "attention"
    if "mlp" in low or "ffn" in low or "feed_forward" in low:
        return "ffn"
    return "other"


def _has_matrix_param(m: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in m.parameters())


@dataclass
class _Context:
    batch: Optional[int]
    seq: Optional[int]
    hidden_size: Optional[int]
    dtype: Optional[torch.dtype]

    @property
    def tokens(self) -> Optional[int]:
        return None if self.batch is None else self.batch * self.seq


def _module_dtype(m: nn.Module, default=None):
    for p in m.parameters():
        if p.is_floating_point():
            return p.dtype
    return default


def _ffn_site(layer: int, name: str, m: FusedCheckpointedFFN, ctx: _Context) -> Site:
    opts = {}
    T = ctx.tokens
    dtype = ctx.dtype or m.param_dtype
    fc1_rows = m.fc1_rows
    for d in FFN_DIALS:
        if T is None:
            opts[d] = Option(d, None, None)
        else:
            opts[d] = Option(d, m.saved_bytes(T, recompute=d, dtype=dtype), m.recompute_flops(T, recompute=d),
                             0 if d == "none" else T * fc1_rows)
    return Site(layer, name, "ffn", "ffn", opts, m)


def _attention_site(layer: int, name: str, m: nn.Module, ctx: _Context) -> Site:
    opts = {}
    dtype = ctx.dtype or next(m.parameters()).dtype
    e = torch.empty((), dtype=dtype).element_size()
    lse = 8 if dtype == torch.float64 else 4
    for d in ATTENTION_DIALS:
        if ctx.tokens is None:
            opts[d] = Option(d, None, None)
            continue
        rope = ctx.tokens * (m.n_heads + m.n_kv_heads) * m.head_dim if m.rope_theta is not None else 0
        opts[d] = Option(
            d,
            attention_saved_bytes(ctx.tokens, m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, d, e, lse)
            + attention_lora_bytes(m, ctx.tokens, dtype),  # PEFT LoRA in the op: one [tokens, r] per adapter
            attention_recompute_flops(ctx.batch, ctx.seq, m.d_model, m.n_heads, m.n_kv_heads, m.head_dim,
                                      m.causal, d),
            0 if d is False else rope,
        )
    return Site(layer, name, "attention", "attention", opts, m)


def _checkpoint_site(layer: int, name: str, role: str, m: nn.Module, ctx: _Context) -> Site:
    dtype = ctx.dtype or _module_dtype(m, torch.float32)
    known = ctx.tokens is not None and ctx.hidden_size is not None
    b = ctx.tokens * ctx.hidden_size * torch.empty((), dtype=dtype).element_size() if known else None
    opts = {True: Option(True, b, None), False: Option(False, None, 0)}
    return Site(layer, name, "checkpoint", role, opts, m)


def build_layers(model: nn.Module, layers: Optional[Sequence[nn.Module]] = None, *, batch=None, seq=None,
                 dtype=None) -> list[LayerSpec]:
    """The :class:`LayerSpec` list of ``model`` (sites, options and their predictions)."""
    if layers is None:
        _, layers = find_layers(model)
    layers = list(layers)
    names = {id(m): n for n, m in model.named_modules()}
    cfg = getattr(model, "config", None)
    hidden = None
    if cfg is not None:
        hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    ctx = _Context(batch, seq, hidden, dtype)
    specs = []
    for i, layer in enumerate(layers):
        lname = names.get(id(layer), f"layer{i}")
        sites = []
        fused = [(n, m) for n, m in layer.named_modules() if isinstance(m, _FUSED_TYPES)]
        for n, m in fused:
            q = f"{lname}.{n}" if lname else n
            if isinstance(m, FusedCheckpointedFFN):
                sites.append(_ffn_site(i, q, m, ctx))
            elif isinstance(m, FusedCheckpointedAttention):
                sites.append(_attention_site(i, q, m, ctx))
        if not fused:
            sites.append(_checkpoint_site(i, lname, "layer", layer, ctx))
        else:
            for n, child in layer.named_children():
                if isinstance(child, _FUSED_TYPES) or _count_fused(child) or not _has_matrix_param(child):
                    continue
                sites.append(_checkpoint_site(i, f"{lname}.{n}", _role(n), child, ctx))
        alts = _block_alternatives(layer, ctx)
        specs.append(LayerSpec(i, lname, sites, alternatives=alts, module=layer,
                               site_bytes=_block_norm_bytes(layer, ctx) if alts and ctx.batch else 0))
    return specs


def _block_alternatives(layer: nn.Module, ctx: "_Context") -> list:
    """A FusedCheckpointedBlock's whole-layer option (:func:`block_full_option`)."""
    if not _is_fused_block(layer):
        return []
    if ctx.batch is None:  # chosen by the uniform policies all the same; bytes unknown
        return [Option("full", None, None)]
    a, m = layer.block_attention, layer.block_ffn  # whatever the layer names them (self_attn, attn, attention)
    dtype = ctx.dtype or m.param_dtype
    return [block_full_option(ctx.batch, ctx.seq, a.d_model, a.n_heads, a.n_kv_heads, a.head_dim, a.causal,
                              m.recompute_flops(ctx.tokens, recompute=True), m.fc1_rows,
                              torch.empty((), dtype=dtype).element_size(), layer.norm == "layernorm",
                              layer.placement, 2 * ctx.tokens * m.d_model * (m.fc1_rows + m.d_ff),
                              layer.lora_costs(ctx.tokens, dtype))]


def _block_norm_bytes(layer: nn.Module, ctx: "_Context") -> int:
    """What a FusedCheckpointedBlock's norms keep when its submodules' dials govern."""
    return layer.norms_saved_bytes(ctx.batch * ctx.seq, ctx.dtype)


def _is_fused_block(m: nn.Module) -> bool:
    return isinstance(m, FusedCheckpointedBlock)


__all__ = ["Site", "LayerSpec", "find_layers", "build_layers"]
