"""Hardening of the ops against inputs that used to give silent wrong results or internal errors:
tensors whose last dimension is not contiguous, float64 on each backend, and empty inputs."""
from __future__ import annotations

import math

import pytest
import torch

import fused_ckpt as fc
import fused_ckpt.ops.attention as attention_ops
from fused_ckpt.ops.attention import flash_attn_backward, flash_attn_forward

from .conftest import HAS_CUDA, INTERPRET
from .helpers import assert_close_by_rule

DEV = "cuda" if HAS_CUDA else "cpu"
TRITON_OK = HAS_CUDA or INTERPRET
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or TRITON_INTERPRET=1")
BACKENDS = [pytest.param("triton", marks=needs_triton), "aten"]


def last_dim_strided(t: torch.Tensor) -> torch.Tensor:
    """The same values with a last-dimension stride != 1 (column-major in the last two dims;
    a 1-D tensor becomes every other element of a buffer twice its size)."""
    if t.dim() == 1:
        return torch.stack([t, torch.full_like(t, float("nan"))], -1)[:, 0]
    out = t.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert out.stride(-1) != 1 and torch.equal(out, t)
    return out


def _leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).clone().requires_grad_()


# --------------------------------------------------------------------------- references
def ref_attention(q, k, v, causal):
    B, S_q, H, D = q.shape
    S_kv, H_kv = k.shape[1], k.shape[2]
    k = k.repeat_interleave(H // H_kv, 2)
    v = v.repeat_interleave(H // H_kv, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
    if causal:
        keep = torch.arange(S_kv)[None, :] <= torch.arange(S_q)[:, None] + S_kv - S_q
        s = s.masked_fill(~keep.to(q.device), float("-inf"))
    p = torch.softmax(s, -1, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def ref_norm(x, w, b, rms, eps):
    xf = x.double() if x.dtype == torch.float64 else x.float()
    if rms:
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    else:
        y = torch.nn.functional.layer_norm(xf, xf.shape[-1:], eps=eps)
    y = y * w.to(xf.dtype)
    if b is not None:
        y = y + b.to(xf.dtype)
    return y.to(x.dtype)


def check_by_rule(fn, ref_fn, inputs, strided, dout_strided=False):
    """fn on ``inputs`` (those indexed by ``strided`` given a non-unit last-dim stride, and the
    upstream gradient too when ``dout_strided``): output and every gradient by the 2x rule
    against ref_fn in float64, with ref_fn in the inputs' dtype as PyTorch's own error."""
    leaves = [_leaf(last_dim_strided(t) if i in strided else t) for i, t in enumerate(inputs)]
    for i in strided:
        assert leaves[i].stride(-1) != 1
    out = fn(*leaves)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, last_dim_strided(dout) if dout_strided else dout)
    ref_leaves = [_leaf(t, torch.float64) for t in inputs]
    ref = ref_fn(*ref_leaves)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    pt_leaves = [_leaf(t) for t in inputs]
    pt = ref_fn(*pt_leaves)
    pt_grads = torch.autograd.grad(pt, pt_leaves, dout)
    assert_close_by_rule(out, ref, pt, "out")
    for i, (g, r, p) in enumerate(zip(grads, ref_grads, pt_grads)):
        assert_close_by_rule(g, r, p, f"grad {i}")


# --------------------------------------------------------------------------- item 1: strides
@pytest.mark.parametrize("path", ["cpu_flash", "math"])
@pytest.mark.parametrize("which", ["q", "k", "v", "dout"])
def test_aten_attention_last_dim_not_contiguous(which, path, monkeypatch):
    """PyTorch's private CPU flash kernel reads the last dimension as contiguous: such
    inputs used to give garbage (1e26, nan) that changed from run to run."""
    if path == "math":
        monkeypatch.setattr(attention_ops, "_use_cpu_flash", lambda q, k: False)
    q = torch.randn(1, 5, 4, 32)
    k = torch.randn(1, 6, 2, 32)
    v = torch.randn(1, 6, 2, 32)
    strided = {"q": {0}, "k": {1}, "v": {2}, "dout": set()}[which]
    check_by_rule(lambda q, k, v: fc.flash_attention(q, k, v, causal=True, backend="aten"),
                  lambda q, k, v: ref_attention(q, k, v, True), [q, k, v], strided, which == "dout")


def test_aten_attention_backward_strided_saved_tensors():
    """The backward op called with o, lse and dO whose layouts the kernel would misread gives
    the same gradients as with contiguous ones."""
    q, k, v = (torch.randn(1, 5, 2, 32) for _ in range(3))
    o, lse = flash_attn_forward(q, k, v, None, True, 32 ** -0.5, "aten")
    do = torch.randn_like(o)
    lse_strided = lse.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert lse_strided.stride(-1) != 1
    args = (True, 32 ** -0.5, [True, True, True], "aten")
    want = flash_attn_backward(do, q, k, v, o, lse, None, *args)
    got = flash_attn_backward(last_dim_strided(do), last_dim_strided(q), k, v, last_dim_strided(o),
                              lse_strided, None, *args)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
