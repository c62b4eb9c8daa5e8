"""PEFT (LoRA) and other wrapped projections, as the Hugging Face patcher sees them.

A projection the fused ops read by weight must compute exactly ``F.linear(x, weight, bias)``
(or a Conv1D's transposed form). PEFT's ``lora.Linear`` forwards ``.weight`` to its base layer
but adds ``scaling * B(A(dropout(x)))`` in its forward; a quantized linear (bitsandbytes'
``Linear4bit``, a GPTQ/AWQ layer) computes with weights that are not the ``weight`` tensor.
Reading their weight alone would drop or approximate that math. Vanilla LoRA on a plain base
(:func:`lora_wrappers`) is computed inside the fused FFN and attention ops; other wrapped or
non-plain projections are left alone, with the reason given here, and a fused module whose
children are replaced after patching by anything else runs its exact unfused path
(:mod:`fused_ckpt.modules._swap`).

Nothing here imports ``peft``: wrappers are recognised by their module and attributes.
"""
from __future__ import annotations

from typing import Iterable, Optional

from torch import nn

from ..modules._swap import describe


def is_peft_layer(m: nn.Module) -> bool:
    """A PEFT tuner layer (LoRA or another method) wrapping a base layer."""
    return type(m).__module__.startswith("peft.") and hasattr(m, "base_layer")


def _plain_projection(m: nn.Module) -> bool:
    """``nn.Linear`` itself (or a subclass that keeps its forward), or a transformers Conv1D."""
    if isinstance(m, nn.Linear):
        return type(m).forward is nn.Linear.forward
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers.")


def projection_refusal(module: nn.Module, names: Optional[Iterable[str]] = None) -> Optional[str]:
    """None when none of ``module``'s children ``names`` (default: all that hold a ``weight``)
    is a wrapped or non-plain projection, else the reason for leaving ``module`` alone: a PEFT
    wrapper (LoRA or other; the base layer type named) or a linear with its own forward (a
    quantized base layer)."""
    children = dict(module.named_children())
    picked = [n for n in (names if names is not None else children) if n in children]
    for n in picked:
        c = children[n]
        if is_peft_layer(c):
            return (f"{n} is {describe(c)}: the low-rank terms are not in the fused op; the unpatched "
                    "PEFT forward runs (exact)")
        if hasattr(c, "weight") and (isinstance(c, nn.Linear) or "linear" in type(c).__name__.lower()) \
                and not _plain_projection(c):
            return (f"{n} is {describe(c)}, a linear layer with its own forward (e.g. a quantized base "
                    "layer): its weight tensor is not its math, so it is not fused")
    return None


def lora_wrappers(module: nn.Module) -> tuple:
    """``({name: wrapper}, None)``: the children of ``module`` that are PEFT ``lora.Linear``
    wrappers the fused FFN and attention compute exactly in their ops (``ops/ffn_lora.py``,
    ``ops/attn_lora.py``; vanilla LoRA, or merged / disabled adapters, around
    a plain ``nn.Linear`` / Conv1D base); ``(None, reason)`` when some child is a wrapper or
    projection it cannot take (another PEFT method, DoRA or another variant, a LoRA bias, a
    quantized base layer, ...)."""
    from ..modules._swap import lora_of

    found = {}
    for name, c in module.named_children():
        if not is_peft_layer(c):
            continue
        base = c.base_layer
        if not _plain_projection(base):
            return None, (f"{name} is {describe(c)} whose base layer is not a plain Linear / Conv1D (e.g. a "
                          "quantized base layer): its weight tensor is not its math, so it is not fused")
        factors, why = lora_of(c, base)
        if factors is None:
            return None, f"{name} is {describe(c)}: {why}; the unpatched PEFT forward runs (exact)"
        found[name] = c
    return found, None
