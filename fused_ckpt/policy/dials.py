"""Dials and their costs: the values each site kind takes, an :class:`Option` (a dial with its
predicted saved bytes and recompute FLOPs), and the per-site cost formulas.

The attention formulas live in :mod:`fused_ckpt.accounting` (the module layer uses them too,
:meth:`FusedCheckpointedBlock.saved_bytes`) and are re-exported here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..accounting import (attention_forward_flops, attention_recompute_flops, attention_saved_bytes,
                          normalize_attention_dial as _norm_attention_dial)
from ..ops.block import full_saved_bytes

FFN_DIALS = (True, False, "none")            # most recompute first
ATTENTION_DIALS = ("all", "qkv", False)
CHECKPOINT_DIALS = (True, False)
# the LM head + loss (planner only): FusedLinearCrossEntropy recompute=True / False, or eager
# (F.linear + cross-entropy, keeping the [T, V] log-softmax)
HEAD_DIALS = (True, False, "logits")
DIALS = {"ffn": FFN_DIALS, "attention": ATTENTION_DIALS, "checkpoint": CHECKPOINT_DIALS, "head": HEAD_DIALS}
FULL = {"ffn": True, "attention": "all", "checkpoint": True, "head": True}
NONE = {"ffn": "none", "attention": False, "checkpoint": False, "head": "logits"}


def _norm_dial(kind: str, dial):
    if kind == "attention":
        return _norm_attention_dial(dial)
    for d in DIALS[kind]:
        if dial is d or (isinstance(dial, str) and dial == d):
            return d
    raise ValueError(f"{kind} dial must be one of {DIALS[kind]}, got {dial!r}")


@dataclass(frozen=True)
class Option:
    """One dial value of a site with its predicted saved bytes and recompute cost. ``aux`` is the
    tie-breaking cost (elementwise values recomputed); None fields are unknown."""

    dial: Any
    saved_bytes: Optional[int]
    recompute_flops: Optional[int]
    aux: int = 0


def block_full_option(batch: int, seq: int, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int,
                      causal: bool, ffn_recompute_flops: int, fc1_rows: int, elem: int,
                      layer_norm: bool = False, placement: str = "pre", ffn_forward_flops: int = 0,
                      lora: tuple = ((), 0, 0)) -> Option:
    """A block's whole-layer "full" recompute (:mod:`fused_ckpt.ops.block`) as an Option:
    saves x (e T d) and the norms' fp32 per-row statistics (which ones depend on the norm
    ``placement``); recomputes the q/k/v projections, the attention forward, o_proj and (inside
    the FFN backward, ``ffn_recompute_flops``) the up-projection; with a norm after the FFN
    ("sandwich", "post") also the FFN's forward (``ffn_forward_flops``). ``lora``: PEFT LoRA
    adapters in the block op, :meth:`FusedCheckpointedBlock.lora_costs` (the FFN adapters' ranks
    and factor size: their ``[tokens, r]`` products are kept; the rank-r GEMMs re-run)."""
    T = batch * seq
    ranks, lora_elem, lora_flops = lora
    saved = full_saved_bytes(T, d_model, elem, layer_norm, placement, ranks, lora_elem)
    flops = (attention_recompute_flops(batch, seq, d_model, n_heads, n_kv_heads, head_dim, causal, "all")
             + 2 * T * n_heads * head_dim * d_model + ffn_recompute_flops
             + (ffn_forward_flops if placement in ("sandwich", "post") else 0) + lora_flops)
    return Option("full", saved, flops, T * fc1_rows)


__all__ = ["FFN_DIALS", "ATTENTION_DIALS", "CHECKPOINT_DIALS", "HEAD_DIALS", "DIALS", "FULL", "NONE", "Option",
           "block_full_option", "attention_saved_bytes", "attention_forward_flops", "attention_recompute_flops"]
