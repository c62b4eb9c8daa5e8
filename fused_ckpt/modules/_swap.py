"""Forward-time guard of the fused modules that read weights from submodules.

A fused module (an FFN or attention holding another model's projections, a whole-layer block)
reads ``child.weight`` / ``child.bias`` and runs the fused op on them; it never calls the child.
When a child is replaced after construction (PEFT's ``lora.Linear`` around it, a quantized
linear, any other module in its place) the fused op would keep reading a ``weight`` (PEFT
forwards it to the base layer) and silently drop whatever the new child adds. So each fused
module records the children it reads at construction and, at every forward, compares them by
identity (a few dictionary look-ups); on a difference it runs its exact unfused path, which
calls the current children, and warns once per module.
"""
from __future__ import annotations

import warnings
from typing import Iterable, Optional

from torch import nn

_RECORD = "_fused_children"
_WARNED = "_fused_swap_warned"


def record_children(module: nn.Module, names: Iterable[str]) -> None:
    """Remember which objects ``module``'s children ``names`` are now (not registered as
    submodules: the state dict and ``modules()`` do not change)."""
    module.__dict__[_RECORD] = {n: module._modules[n] for n in names if module._modules.get(n) is not None}


def describe(child) -> str:
    """What a child is, for the warning and the patch report: PEFT LoRA wrappers and quantized
    layers named as such."""
    cls = type(child)
    what = f"{cls.__module__}.{cls.__qualname__}"
    if cls.__module__.startswith("peft."):
        base = getattr(child, "base_layer", None)
        inner = f" around a {type(base).__name__}" if base is not None else ""
        kind = "LoRA wrapper" if "lora" in cls.__module__ else "PEFT adapter wrapper"
        return f"a PEFT {kind} ({what}){inner}"
    return f"a {what}"


def swapped_child(module: nn.Module) -> Optional[str]:
    """None when every recorded child of ``module`` is still the object it was built from,
    else which child changed and into what."""
    rec = module.__dict__.get(_RECORD)
    if not rec:
        return None
    mods = module._modules
    for name, child in rec.items():
        now = mods.get(name)
        if now is not child:
            return f"{name} is now {describe(now)}, not the {type(child).__name__} it was built from"
    return None


def warn_unfused(module: nn.Module, reason: str) -> None:
    """Warn once per module that it runs its unfused path, naming it and the reason."""
    if module.__dict__.get(_WARNED):
        return
    module.__dict__[_WARNED] = True
    name = module.__dict__.get("_fused_qualname")
    where = f"{type(module).__name__}" + (f" {name!r}" if name else "")
    warnings.warn(f"fused_ckpt: {where}: {reason}; running the exact unfused path on the current submodules "
                  "(no fused recompute for it)", stacklevel=3)
