"""Checkpoint wrapping of modules without a fused version: their ``forward`` runs under a
non-reentrant ``torch.utils.checkpoint``, installed and removed in place."""
from __future__ import annotations

import types

import torch
from torch import nn


def _checkpointed_forward(self, *args, **kwargs):
    """Instance ``forward`` installed on a checkpoint site: non-reentrant checkpoint of the
    module's own forward. A ``hidden_states`` keyword goes positional so that the checkpoint
    saves it through ``save_for_backward`` (visible to saved-tensor hooks); KV caches are
    dropped in training, as Hugging Face's own checkpointing does (a replayed forward would
    update them twice)."""
    inner = self.__dict__.get("_fused_ckpt_prev_forward") or types.MethodType(type(self).forward, self)
    if not (torch.is_grad_enabled() and self.training):
        return inner(*args, **kwargs)
    for key in ("cache", "past_key_values", "past_key_value", "layer_past"):
        if kwargs.get(key) is not None:
            kwargs[key] = None
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    if not args and isinstance(kwargs.get("hidden_states"), torch.Tensor):
        h = kwargs.pop("hidden_states")
        return torch.utils.checkpoint.checkpoint(lambda hs, **kw: inner(hidden_states=hs, **kw), h,
                                                 use_reentrant=False, **kwargs)
    return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, **kwargs)


def is_checkpointed(module: nn.Module) -> bool:
    """Whether fused_ckpt wrapped ``module`` in a non-reentrant checkpoint."""
    fwd = module.__dict__.get("forward")
    return isinstance(fwd, types.MethodType) and fwd.__func__ is _checkpointed_forward


def set_checkpoint(module: nn.Module, on: bool) -> None:
    """Wrap (or unwrap) ``module``'s forward in a non-reentrant checkpoint, in place: the
    state dict and parameter names do not change."""
    if on == is_checkpointed(module):
        return
    if on:
        prev = module.__dict__.get("forward")
        if prev is not None:
            module._fused_ckpt_prev_forward = prev
        module.forward = types.MethodType(_checkpointed_forward, module)
    else:
        prev = module.__dict__.pop("_fused_ckpt_prev_forward", None)
        del module.forward
        if prev is not None:
            module.forward = prev


__all__ = ["is_checkpointed", "set_checkpoint"]
