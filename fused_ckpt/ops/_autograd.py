"""Autograd helpers shared by the ops."""
from __future__ import annotations

import torch


class _NoDoubleBackward(torch.autograd.Function):
    """Passes first-order gradients through; differentiating them raises a clear error."""

    @staticmethod
    def forward(ctx, what: str, anchor, *grads):
        ctx.op_name = what
        return grads

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(f"fused_ckpt {ctx.op_name} does not support double backward (differentiating its "
                           "gradients); use the eager PyTorch equivalent for higher-order gradients")


def guard_double_backward(grads: tuple, inputs: tuple, what: str) -> tuple:
    """Under ``create_graph=True`` (grad mode on inside backward), return ``grads`` attached to a
    node whose backward raises, so first-order use works and second-order use fails loudly."""
    anchor = next((t for t in inputs if t is not None and t.requires_grad), None)
    if torch.is_grad_enabled() and anchor is not None:
        return _NoDoubleBackward.apply(what, anchor, *grads)
    return grads
