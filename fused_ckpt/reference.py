"""Plain-PyTorch references used by tests, benchmarks and the demo (no fused kernels)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .activations import get_activation


def ffn_reference(x, w1, b1, w2, b2, activation: str = "gelu") -> torch.Tensor:
    """Eager FFN: what autograd would save is z, h (and x); the math every backend must match."""
    act = get_activation(activation)
    return F.linear(act.hidden(F.linear(x, w1, b1)), w2, b2)


class EagerMLP(nn.Module):
    """The eager MLP a user would write, with the same parameter layout as FusedCheckpointedFFN.

    ``checkpoint``: None (no checkpointing), "non_reentrant" or "reentrant"
    (``torch.utils.checkpoint`` of the whole MLP).
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", bias: bool = True,
                 checkpoint: str | None = None, device=None, dtype=None):
        super().__init__()
        if checkpoint not in (None, "non_reentrant", "reentrant"):
            raise ValueError(f"checkpoint must be None, 'non_reentrant' or 'reentrant', got {checkpoint!r}")
        self.act = get_activation(activation)
        self.checkpoint = checkpoint
        self.fc1 = nn.Linear(d_model, self.act.fc1_rows(d_ff), bias=bias, device=device, dtype=dtype)
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias, device=device, dtype=dtype)

    def _mlp(self, x):
        return self.fc2(self.act.hidden(self.fc1(x)))

    def forward(self, x):
        if self.checkpoint is None or not torch.is_grad_enabled():
            return self._mlp(x)
        return checkpoint(self._mlp, x, use_reentrant=self.checkpoint == "reentrant")
