"""RMSNorm / LayerNorm modules over the fused norm ops (state dicts match torch and HF norms)."""
from __future__ import annotations

import torch
from torch import nn

from ..ops.norm import layer_norm, rms_norm


class FusedRMSNorm(nn.Module):
    """RMSNorm, Llama style (fp32 math, one rounding): keeps x and the per-row rstd for backward.

    ``offset=1.0`` is the Gemma family's ``(1 + w)`` RMSNorm: ``y = xhat * (1 + w.float())``
    (fp32, one rounding), the weight initialised to zeros as Gemma's is.

    Equivalent PyTorch: ``transformers``' ``LlamaRMSNorm(d, eps)``, ``torch.nn.RMSNorm(d, eps)``;
    with ``offset=1.0``, ``GemmaRMSNorm(d, eps)``.
    """

    def __init__(self, d_model: int, eps: float = 1e-6, elementwise_affine: bool = True, device=None,
                 dtype=None, *, backend: str = "auto", offset: float = 0.0):
        super().__init__()
        if offset and not elementwise_affine:
            raise ValueError(f"FusedRMSNorm: offset={offset} needs elementwise_affine=True")
        self.d_model, self.eps, self.backend, self.offset = d_model, eps, backend, float(offset)
        init = torch.zeros if offset else torch.ones
        self.weight = nn.Parameter(init(d_model, device=device, dtype=dtype)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.backend, offset=self.offset)

    def extra_repr(self) -> str:
        return f"{self.d_model}, eps={self.eps}" + (f", offset={self.offset}" if self.offset else "")


class FusedLayerNorm(nn.Module):
    """LayerNorm (fp32 math, one rounding): keeps x, the per-row mean and rstd for backward.

    Equivalent PyTorch: ``torch.nn.LayerNorm(d, eps)``.
    """

    def __init__(self, d_model: int, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, *, backend: str = "auto"):
        super().__init__()
        self.d_model, self.eps, self.backend = d_model, eps, backend
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.ones(d_model, **factory)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(d_model, **factory)) if elementwise_affine and bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps, self.backend)

    def extra_repr(self) -> str:
        return f"{self.d_model}, eps={self.eps}"
