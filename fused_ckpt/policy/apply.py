"""The entry point: :func:`apply_checkpointing` sets a policy's dials on a model."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from .dials import _norm_dial
from .discovery import _is_fused_block, build_layers
from .hf_guard import install_hf_guard
from .policies import MemoryBudget, Policy, resolve_policy
from .report import CheckpointPlan, PlanRow
from .wrap import set_checkpoint


def apply_checkpointing(model: nn.Module, policy: Union[str, Policy] = "full", *, tokens: Optional[int] = None,
                        batch: Optional[int] = None, seq: Optional[int] = None,
                        layers: Optional[Sequence[nn.Module]] = None,
                        dtype: Optional[torch.dtype] = None) -> CheckpointPlan:
    """Set every fused module's ``recompute`` dial and wrap non-fused sites in checkpoints.

    Args:
        policy: ``"none"``, ``"full"``, ``"sqrt"``, :class:`EveryN`, :class:`Selective`,
            :class:`MemoryBudget`, :class:`PerLayer` (module docstring has the dials).
        tokens / batch, seq: the shape predictions are made for (``tokens`` alone means one
            sequence of that length). Required by :class:`MemoryBudget` unless it carries
            ``batch`` and ``seq`` itself.
        layers: the blocks, when :func:`find_layers` does not find them.
        dtype: activation dtype for predictions (default: each module's parameter dtype;
            pass the autocast dtype when training under autocast).

    After this call fused_ckpt owns the recompute of every layer: Hugging Face's per-layer
    checkpointing flag is switched off on them, now and if it is switched on later.
    Returns the :class:`CheckpointPlan` (per-site dials, predicted bytes and FLOPs).
    """
    pol = resolve_policy(policy)
    if tokens is not None:
        if batch is not None or seq is not None:
            raise ValueError("pass either tokens or batch and seq, not both")
        batch, seq = 1, tokens
    if (batch is None) != (seq is None):
        raise ValueError("batch and seq go together")
    if batch is None and isinstance(pol, MemoryBudget) and pol.batch is not None:
        batch, seq = pol.batch, pol.seq
    for n, v in (("batch", batch), ("seq", seq)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ValueError(f"{n} must be a positive int, got {v!r}")
    if pol.needs_tokens() and batch is None:
        raise ValueError(f"{pol.name} needs the token count to predict bytes: pass MemoryBudget(bytes, batch=..., "
                         "seq=...) or apply_checkpointing(..., batch=..., seq=...)")
    specs = build_layers(model, layers, batch=batch, seq=seq, dtype=dtype)
    assignment = pol.assign(specs)
    rows = []
    notes = []
    if tokens is not None:
        notes.append(f"tokens={tokens} taken as one sequence (batch 1) for attention FLOPs")
    hf_off = blocks_released = 0
    for spec, dials in zip(specs, assignment):
        if spec.name in dials and spec.alternatives:  # the whole-layer option was chosen
            o = next(a for a in spec.alternatives if a.dial == dials[spec.name])
            spec.module.recompute = o.dial
            rows.append(PlanRow(spec.index, spec.name, "block", o.dial, o.saved_bytes, o.recompute_flops))
            layer_mod = _layer_module(model, spec.name, layers, spec.index)
            if layer_mod is not None:
                hf_off += install_hf_guard(layer_mod)
            continue
        for s in spec.sites:
            d = _norm_dial(s.kind, dials[s.name])
            if s.kind in ("ffn", "attention"):
                s.module.recompute = d
            else:
                set_checkpoint(s.module, bool(d))
            o = s.options[d]
            rows.append(PlanRow(spec.index, s.name, s.kind, d, o.saved_bytes, o.recompute_flops))
        layer_mod = _layer_module(model, spec.name, layers, spec.index)
        if layer_mod is not None:
            hf_off += install_hf_guard(layer_mod)
            if getattr(layer_mod, "recompute", None) == "full" and _is_fused_block(layer_mod):
                # the block's own whole-block recompute would override the dials just set
                layer_mod.recompute = None
                blocks_released += 1
        if spec.site_bytes:
            rows.append(PlanRow(spec.index, f"{spec.name} (norms)", "fixed", None, spec.site_bytes, 0))
    if hf_off:
        notes.append(f"Hugging Face activation checkpointing switched off on {hf_off} layer(s) (fused_ckpt "
                     "sets their recompute)")
    if blocks_released:
        notes.append(f"{blocks_released} FusedCheckpointedBlock(s) switched from recompute='full' to their "
                     "submodules' dials (the policy's)")
    return CheckpointPlan(rows, pol.name, batch, seq, notes)


def _layer_module(model, name, layers, index):
    if layers is not None:
        return list(layers)[index]
    return model.get_submodule(name) if name else model


__all__ = ["apply_checkpointing"]
