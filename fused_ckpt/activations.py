"""Activation registry: the names users pass, the plain-PyTorch math, and the ids kernels use.

Every kernel backend (Triton helpers in ``kernels/activation.py``, the C++/CUDA header
``csrc/activations.h``) implements the same four base functions; this module is the single
place that maps a user-facing name onto (base function, gated or not).

===============  ==========================  ======================================
name             hidden h                    pre-activation z (width)
===============  ==========================  ======================================
``relu``         relu(z)                     z = x W1^T + b1            (d_ff)
``gelu``         gelu(z), erf form           z                          (d_ff)
``gelu_tanh``    gelu(z), tanh approximation z                          (d_ff)
``silu``         silu(z)                     z                          (d_ff)
``swiglu``       silu(g) * u                 [g | u], gate columns first (2*d_ff)
``geglu``        gelu(g) * u                 [g | u]                    (2*d_ff)
``geglu_tanh``   gelu_tanh(g) * u            [g | u]                    (2*d_ff)
===============  ==========================  ======================================
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

# Base-function ids shared with the Triton kernels (a tl.constexpr) and csrc (an int).
RELU, GELU, GELU_TANH, SILU = 0, 1, 2, 3

_BASE_FN: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    RELU: F.relu,
    GELU: lambda z: F.gelu(z, approximate="none"),
    GELU_TANH: lambda z: F.gelu(z, approximate="tanh"),
    SILU: F.silu,
}


def _base_grad(base: int, z: torch.Tensor) -> torch.Tensor:
    """d/dz of the base function, in closed form (used by references and docs, not kernels)."""
    if base == RELU:
        return (z > 0).to(z.dtype)
    if base == GELU:
        return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0))) + z * torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    if base == GELU_TANH:
        c = math.sqrt(2.0 / math.pi)
        t = torch.tanh(c * (z + 0.044715 * z**3))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * z * z)
    if base == SILU:
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    raise AssertionError(base)


@dataclass(frozen=True)
class Activation:
    name: str
    base: int  # RELU / GELU / GELU_TANH / SILU
    gated: bool

    def base_fn(self, z: torch.Tensor) -> torch.Tensor:
        return _BASE_FN[self.base](z)

    def base_grad(self, z: torch.Tensor) -> torch.Tensor:
        return _base_grad(self.base, z)

    def hidden(self, z: torch.Tensor) -> torch.Tensor:
        """h from the pre-activation z (last dim d_ff, or 2*d_ff when gated)."""
        if self.gated:
            g, u = z.chunk(2, dim=-1)
            return self.base_fn(g) * u
        return self.base_fn(z)

    def fc1_rows(self, d_ff: int) -> int:
        return 2 * d_ff if self.gated else d_ff


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("relu", RELU, False),
        Activation("gelu", GELU, False),
        Activation("gelu_tanh", GELU_TANH, False),
        Activation("silu", SILU, False),
        Activation("swiglu", SILU, True),
        Activation("geglu", GELU, True),
        Activation("geglu_tanh", GELU_TANH, True),
    )
}


def get_activation(name: str | Activation) -> Activation:
    if isinstance(name, Activation):
        return name
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(
            f"unknown activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}"
        )
    return ACTIVATIONS[name]
