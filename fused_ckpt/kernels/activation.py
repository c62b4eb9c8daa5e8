"""Activation math as ``@triton.jit`` helpers: written once, used by every FFN kernel.

``ACT`` is a ``tl.constexpr`` base id from :mod:`fused_ckpt.activations` (RELU=0, GELU=1,
GELU_TANH=2, SILU=3); the branches are resolved at compile time. All math is fp32.
``tanh`` is written through ``exp`` so the helpers need no libdevice (same code on CUDA and
under ``TRITON_INTERPRET=1``, triton 3.6 through 3.9).
"""
import triton
import triton.language as tl

# Globals read inside @triton.jit code must be tl.constexpr (the compiler rejects plain floats;
# the interpreter does not, which is why tools/aot_compile.py compiles every kernel for sm_90).
_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1/sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1/sqrt(2*pi)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # sqrt(2/pi)
_GELU_TANH_C = tl.constexpr(0.044715)


@triton.jit
def _tanh(u):
    # 1 - 2 / (exp(2u) + 1): exact limits at +-inf, no overflow to NaN.
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def act_fwd(z, ACT: tl.constexpr):
    """f(z) for the base function ACT (z fp32)."""
    if ACT == 0:
        return tl.where(z > 0, z, 0.0)
    elif ACT == 1:
        return 0.5 * z * (1.0 + tl.erf(z * _SQRT1_2))
    elif ACT == 2:
        t = _tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_C * z * z * z))
        return 0.5 * z * (1.0 + t)
    else:
        return z * tl.sigmoid(z)


@triton.jit
def act_fwd_and_grad(z, ACT: tl.constexpr):
    """(f(z), f'(z)) for the base function ACT, sharing the transcendental work."""
    if ACT == 0:
        pos = z > 0
        return tl.where(pos, z, 0.0), tl.where(pos, 1.0, 0.0)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(z * _SQRT1_2))
        pdf = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
        return z * cdf, cdf + z * pdf
    elif ACT == 2:
        z2 = z * z
        t = _tanh(_SQRT_2_OVER_PI * (z + _GELU_TANH_C * z2 * z))
        dt = (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_C * z2)
        return 0.5 * z * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * z * dt
    else:
        s = tl.sigmoid(z)
        return z * s, s * (1.0 + z * (1.0 - s))
