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
        if now is child:
            continue
        if now is not None and type(now) is type(child) and not (now._forward_pre_hooks or now._forward_hooks):
            # the same kind of module put in its place (e.g. weights shared with another model by
            # assigning its Linear): the fused op reads its weight exactly as it read the old one
            rec[name] = now
            continue
        return f"{name} is now {describe(now)}, not the {type(child).__name__} it was built from"
    return None


def warn_unfused(module: nn.Module, reason: str,
                 instead: str = "running the exact unfused path on the current submodules (no fused recompute for it)",
                 ) -> None:
    """Warn once per module that it does not take its fused path (``instead``: what it does),
    naming it and the reason."""
    if module.__dict__.get(_WARNED):
        return
    module.__dict__[_WARNED] = True
    name = module.__dict__.get("_fused_qualname")
    where = f"{type(module).__name__}" + (f" {name!r}" if name else "")
    warnings.warn(f"fused_ckpt: {where}: {reason}; {instead}", stacklevel=3)


# ----------------------------------------------------------------------------- PEFT LoRA
def lora_of(child, base) -> tuple:
    """``(factors, None)`` when ``child`` is a PEFT ``lora.Linear`` around ``base`` (the very
    module the fused op was built from) whose forward is, exactly, ``base(x) + sum over active
    adapters of scaling * B(A(dropout(x)))``: ``factors`` = ``(A [r, in], B [out, r], scaling,
    dropout p)`` with several adapters joined along r (``B`` then scaled per adapter, scaling
    1), or ``((), None)`` when the forward is ``base(x)`` itself (adapters disabled or merged
    into the base weight). ``(None, reason)`` for anything else: another wrapper or base,
    DoRA or another LoRA variant, a LoRA bias, several adapters with dropout."""
    import torch

    if not (type(child).__module__.startswith("peft.") and hasattr(child, "lora_A")):
        return None, f"{describe(child)} is not a PEFT LoRA layer"
    if getattr(child, "base_layer", None) is not base:
        return None, f"{describe(child)} does not wrap the module the fused op reads"
    if type(child).__name__ != "Linear" or getattr(child, "_mixed_batch_forward", None) is None:
        return None, f"{describe(child)} is not PEFT's lora.Linear"
    for m in (child, base):
        if m._forward_pre_hooks or m._forward_hooks:  # e.g. PEFT's mixed-batch adapter_names hooks
            return None, f"{describe(m)} has forward hooks, which only its own forward runs"
    if child.disable_adapters:
        # peft unmerges a merged adapter at this call (mutating the weight): leave that to its forward
        return (None, "adapters disabled on a merged layer") if child.merged else ((), None)
    if child.merged:
        return (), None  # the merged weight is the math
    names = [a for a in child.active_adapters if a in child.lora_A.keys()]
    if not names:
        return (), None
    As, Bs, ps = [], [], []
    for a in names:
        if a in getattr(child, "lora_variant", {}) or getattr(child, "use_dora", {}).get(a, False):
            return None, f"adapter {a!r} is a LoRA variant (DoRA or other), not vanilla LoRA"
        la, lb, drop = child.lora_A[a], child.lora_B[a], child.lora_dropout[a]
        if type(la) is not torch.nn.Linear or type(lb) is not torch.nn.Linear:
            return None, f"adapter {a!r}: lora_A / lora_B are not plain nn.Linear"
        if la.bias is not None or lb.bias is not None:
            return None, f"adapter {a!r} has a LoRA bias"
        if isinstance(drop, torch.nn.Dropout):
            p = drop.p if drop.training else 0.0
        elif isinstance(drop, torch.nn.Identity):
            p = 0.0
        else:
            return None, f"adapter {a!r}: lora_dropout is a {type(drop).__name__}"
        As.append(la.weight)
        Bs.append((lb.weight, float(child.scaling[a])))
        ps.append(p)
    if len(names) == 1:
        return (As[0], Bs[0][0], Bs[0][1], ps[0]), None
    if any(ps):
        return None, f"adapters {names} with LoRA dropout (one mask per adapter is not in the fused op)"
    return (torch.cat(As, 0), torch.cat([b * s for b, s in Bs], 1), 1.0, 0.0), None


def swapped_lora(module: nn.Module, roles: dict, x, frozen_what: str) -> tuple:
    """``((adapters, p), None)`` for a fused module whose replaced children (since
    :func:`record_children`) are all PEFT ``lora.Linear`` wrappers around the modules it was built
    from (:func:`lora_of`): ``adapters`` = ``{role: (A, B, scaling)}`` by ``roles`` (child name ->
    the op's role; merged or disabled adapters add nothing), ``p`` their one LoRA dropout (None
    without adapters). ``(None, reason)`` when a child is something else, the adapters' dropouts
    differ, their factors' dtype does not suit x's, a recorded child has a trainable weight / bias
    (``frozen_what``: what the fused LoRA path keeps frozen, for the reason), or autocast is on."""
    import torch

    from ..functional import lora_dtype_ok

    rec, mods = module.__dict__.get(_RECORD) or {}, module._modules
    lora, p = {}, None
    for name, base in rec.items():
        now = mods.get(name)
        if now is base:
            continue
        if name not in roles:
            return None, f"{name} is now {describe(now)}, not the {type(base).__name__} it was built from"
        factors, why = lora_of(now, base)
        if factors is None:
            return None, f"{name}: {why}"
        if not factors:
            continue
        a, b, scaling, drop = factors
        if p is not None and drop != p:
            return None, f"the projections' LoRA dropout differ ({p} and {drop})"
        p = drop
        if not lora_dtype_ok(a.dtype, x.dtype) or b.dtype != a.dtype:
            return None, f"{name}: LoRA weights in {a.dtype} / {b.dtype}, input in {x.dtype}"
        lora[roles[name]] = (a, b, scaling)
    if lora:
        params = [getattr(m, n, None) for m in rec.values() for n in ("weight", "bias")]
        if any(isinstance(t, torch.Tensor) and t.requires_grad for t in params):
            return None, f"LoRA on trainable base weights (the fused LoRA path keeps {frozen_what} frozen)"
        if x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type):  # (not meta)
            return None, "LoRA under autocast"
    return (lora, p), None
