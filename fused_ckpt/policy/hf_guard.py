"""The guard against Hugging Face's own per-layer checkpointing on layers fused_ckpt manages."""
from __future__ import annotations

import warnings

from torch import nn

_GUARD_ATTR = "_fused_ckpt_guard"


def _hf_gc_guard(layer: nn.Module, args, kwargs=None):
    """Forward pre-hook on layers fused_ckpt manages: Hugging Face's own per-layer activation
    checkpointing (``gradient_checkpointing_enable()``) would wrap a layer whose recompute is
    already set by dials, recomputing twice; it is switched off on the layer, with a warning."""
    if getattr(layer, "gradient_checkpointing", False):
        layer.gradient_checkpointing = False
        warnings.warn(
            f"fused_ckpt: Hugging Face activation checkpointing was switched on for {type(layer).__name__} layers "
            "that fused_ckpt manages; it is switched off there to avoid recomputing twice. Set recompute with "
            "fused_ckpt.apply_checkpointing(model, policy) instead.", stacklevel=2)


def install_hf_guard(layer: nn.Module) -> bool:
    """Install :func:`_hf_gc_guard` (once). Returns whether HF checkpointing was on and is now off."""
    was_on = bool(getattr(layer, "gradient_checkpointing", False))
    if was_on:
        layer.gradient_checkpointing = False
    if getattr(layer, _GUARD_ATTR, None) is None:
        object.__setattr__(layer, _GUARD_ATTR, layer.register_forward_pre_hook(_hf_gc_guard))
    return was_on


__all__ = ["install_hf_guard"]
