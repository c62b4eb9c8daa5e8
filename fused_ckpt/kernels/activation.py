"""Activation math as ``@triton.jit`` helpers: written once, used by every FFN kernel.

``ACT`` is a ``tl.constexpr`` base id from :mod:`fused_ckpt.activations` (RELU=0, GELU=1,
GELU_TANH=2, SILU=3); the branches are resolved at compile time. All math is fp32.
The tanh-approximated GELU is written through ``sigmoid`` (0.5 * (1 + tanh(u)) = sigmoid(2u)),
so the helpers need no libdevice (same code on CUDA and under ``TRITON_INTERPRET=1``, triton
3.6 through 3.9) and avoid the cancellation of 1 + tanh(u) for large negative inputs.
"""
import triton
import triton.language as tl

# The constants are literals inside the functions: the GPU compiler rejects plain-float globals
# in @jit code, and the interpreter mishandles tl.constexpr globals in arithmetic, so literals are
# the form both accept (tools/aot_compile.py compiles every kernel for sm_90 to keep it so).
#   0.7071067811865476 = 1/sqrt(2)      0.3989422804014327 = 1/sqrt(2*pi)
#   0.7978845608028654 = sqrt(2/pi)     1.5957691216057308 = 2*sqrt(2/pi)
#   0.044715 = GELU tanh-approximation cubic coefficient


@triton.jit
def act_fwd(z, ACT: tl.constexpr):
    """f(z) for the base function ACT (z fp32)."""
    if ACT == 0:
        return tl.where(z > 0, z, 0.0)
    elif ACT == 1:
        return 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 2:
        # 0.5 * (1 + tanh(u)) == sigmoid(2u): no cancellation where tanh(u) is near -1
        return z * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
    else:
        return z * tl.sigmoid(z)


@triton.jit
def act_fwd_and_grad(z, ACT: tl.constexpr):
    """(f(z), f'(z)) for the base function ACT, sharing the transcendental work."""
    if ACT == 0:
        pos = z > 0
        return tl.where(pos, z, 0.0), tl.where(pos, 1.0, 0.0)
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        return z * cdf, cdf + z * pdf
    elif ACT == 2:
        # with s = sigmoid(2u) = 0.5 * (1 + tanh(u)):  f = z s,  f' = s + z * 2 s (1 - s) u'
        z2 = z * z
        s = tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z2 * z))
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * z2)
        return z * s, s + 2.0 * z * s * (1.0 - s) * du
    else:
        s = tl.sigmoid(z)
        return z * s, s * (1.0 + z * (1.0 - s))
