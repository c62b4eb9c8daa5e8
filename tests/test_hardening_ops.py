"""Hardening of the ops against inputs that used to give silent wrong results or internal errors:
tensors whose last dimension is not contiguous, float64 on each backend, and empty inputs."""
from __future__ import annotations

import math

import pytest
import torch

import fused_ckpt as fc
import fused_ckpt.ops.attention as attention_ops
from fused_ckpt.ops.attention import flash_attn_backward, flash_attn_forward

from .helpers import assert_close_by_rule

# Tests parametrized with backend="triton" (or marked triton) run on the GPU when there is one
# (tests/conftest.py makes their tensors there), interpreted on CPU otherwise; the rest on CPU.
BACKENDS = ["triton", "aten"]


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
    leaves = [last_dim_strided(t.detach()).requires_grad_() if i in strided else _leaf(t)
              for i, t in enumerate(inputs)]
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [True, False], ids=["rms", "ln"])
def test_norm_strided_weight_and_input(rms, backend):
    """The Triton norm kernels read weight and bias as contiguous: a strided one (a view into
    a larger buffer) used to be misread."""
    x, w, b = torch.randn(3, 5, 32), torch.randn(32), torch.randn(32)
    inputs = [x, w] if rms else [x, w, b]
    if rms:
        fn = lambda x, w: fc.rms_norm(x, w, 1e-6, backend=backend)  # noqa: E731
        ref = lambda x, w: ref_norm(x, w, None, True, 1e-6)  # noqa: E731
    else:
        fn = lambda x, w, b: fc.layer_norm(x, w, b, 1e-5, backend=backend)  # noqa: E731
        ref = lambda x, w, b: ref_norm(x, w, b, False, 1e-5)  # noqa: E731
    check_by_rule(fn, ref, inputs, set(range(len(inputs))), dout_strided=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ffn_strided_parameters(backend):
    """x, both weights, both biases and dY strided in the last dimension (the Triton FFN read
    fc1.bias as contiguous)."""
    from fused_ckpt.reference import ffn_reference

    x = torch.randn(6, 16)
    w1, b1 = torch.randn(48, 16) / 4, torch.randn(48)
    w2, b2 = torch.randn(16, 24) / 5, torch.randn(16)
    check_by_rule(lambda *a: fc.fused_ffn(*a, activation="swiglu", backend=backend),
                  lambda *a: ffn_reference(*a, activation="swiglu"), [x, w1, b1, w2, b2], set(range(5)),
                  dout_strided=True)


# --------------------------------------------------------------------------- items 2, 3: float64
def assert_fp64_close(got: torch.Tensor, ref: torch.Tensor, name: str, rel: float = 1e-10) -> None:
    """float64 against a float64 reference: equal up to rounding (fp32 anywhere on the way,
    ~1e-7 relative, fails)."""
    assert got.dtype == torch.float64, f"{name}: dtype {got.dtype}"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    scale = ref.abs().max().item()
    assert scale > 0, f"{name}: reference is all zeros (vacuous test)"
    err = (got - ref).abs().max().item()
    assert err <= rel * scale, f"{name}: max error {err:.3e} > {rel} x scale {scale:.3e}"


def ref_rope(x, theta):
    """Hugging Face Llama rotary embedding (rotate_half), positions 0..S-1, in x's dtype."""
    S, D = x.shape[1], x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    freqs = torch.arange(S, dtype=torch.float32)[:, None] * inv
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().to(x.dtype)[None, :, None], emb.sin().to(x.dtype)[None, :, None]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def ref_attention_block(x, wq, bq, wk, bk, wv, bv, wo, bo, H, H_kv, theta):
    B, S, _ = x.shape
    q = ref_rope(torch.nn.functional.linear(x, wq, bq).view(B, S, H, -1), theta)
    k = ref_rope(torch.nn.functional.linear(x, wk, bk).view(B, S, H_kv, -1), theta)
    v = torch.nn.functional.linear(x, wv, bv).view(B, S, H_kv, -1)
    return torch.nn.functional.linear(ref_attention(q, k, v, True).reshape(B, S, -1), wo, bo)


def _block_params(d=64, H=2, H_kv=1, dtype=torch.float64):
    D = d // H
    shapes = [(H * D, d), (H * D,), (H_kv * D, d), (H_kv * D,), (H_kv * D, d), (H_kv * D,), (d, H * D), (d,)]
    return [torch.randn(s, dtype=dtype) / (math.sqrt(s[-1]) if len(s) == 2 else 1) for s in shapes]


def _ffn_params(d=16, f=24, dtype=torch.float64):
    return [torch.randn(2 * f, d, dtype=dtype) / 4, torch.randn(2 * f, dtype=dtype),
            torch.randn(d, f, dtype=dtype) / 5, torch.randn(d, dtype=dtype)]


def _fp64_cases():
    """(name, fused fn, reference fn, inputs) for every op, all float64."""
    from fused_ckpt.reference import ffn_reference

    f64 = dict(dtype=torch.float64)
    x2 = torch.randn(6, 16, **f64)
    x3 = torch.randn(2, 4, 64, **f64)
    qkv = [torch.randn(1, 5, 2, 32, **f64) for _ in range(3)]
    w, b = torch.randn(64, **f64), torch.randn(64, **f64)
    return {
        "ffn": (lambda be: lambda *a: fc.fused_ffn(*a, activation="swiglu", chunk_tokens=4, backend=be),
                lambda *a: ffn_reference(*a, activation="swiglu"), [x2, *_ffn_params()]),
        "flash_attention": (lambda be: lambda q, k, v: fc.flash_attention(q, k, v, causal=True, backend=be),
                            lambda q, k, v: ref_attention(q, k, v, True), qkv),
        "attention_block": (lambda be: lambda x, *p: fc.fused_attention_block(x, *p, 2, 1, rope_theta=1e4,
                                                                               recompute="all", backend=be),
                            lambda x, *p: ref_attention_block(x, *p, 2, 1, 1e4), [x3, *_block_params()]),
        "rms_norm": (lambda be: lambda x, w: fc.rms_norm(x, w, 1e-6, backend=be),
                     lambda x, w: ref_norm(x, w, None, True, 1e-6), [x3, w]),
        "layer_norm": (lambda be: lambda x, w, b: fc.layer_norm(x, w, b, 1e-5, backend=be),
                       lambda x, w, b: ref_norm(x, w, b, False, 1e-5), [x3, w, b]),
    }


FP64_OPS = ["ffn", "flash_attention", "attention_block", "rms_norm", "layer_norm"]


@pytest.mark.triton
@pytest.mark.parametrize("op", FP64_OPS + ["block", "ffn_module", "attention_module", "norm_module"])
def test_triton_refuses_float64(op):
    """The Triton kernels accumulate in fp32 and store fp64 outputs they were not compiled
    for: backend='triton' refuses float64 on every op, naming it and the aten backend."""
    if op in FP64_OPS:
        make, _, inputs = _fp64_cases()[op]
        call = lambda: make("triton")(*inputs)  # noqa: E731
    else:
        mod = {"block": lambda: fc.FusedCheckpointedBlock(64, 2, 32, 1, bias=True, backend="triton"),
               "ffn_module": lambda: fc.FusedCheckpointedFFN(64, 32, "gelu", backend="triton"),
               "attention_module": lambda: fc.FusedCheckpointedAttention(64, 2, rope_theta=1e4, backend="triton"),
               "norm_module": lambda: fc.FusedRMSNorm(64, backend="triton")}[op]().to(dtype=torch.float64)
        call = lambda: mod(torch.randn(1, 3, 64, dtype=torch.float64, requires_grad=True))  # noqa: E731
    with pytest.raises(TypeError, match=r"float64.*backend='aten'"):
        call()


@pytest.mark.parametrize("backend", ["aten", "auto"])
@pytest.mark.parametrize("op", FP64_OPS)
def test_float64_exact(op, backend):
    """float64 runs in float64 on the aten backend ("auto" picks it for float64 inputs):
    output and every gradient equal the float64 reference up to rounding."""
    make, ref_fn, inputs = _fp64_cases()[op]
    leaves = [_leaf(t) for t in inputs]
    out = make(backend)(*leaves)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [_leaf(t) for t in inputs]
    ref = ref_fn(*ref_leaves)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout)
    assert_fp64_close(out, ref, "out")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_fp64_close(g, r, f"grad {i}")


@pytest.mark.parametrize("backend", ["aten", "auto"])
def test_float64_block(backend):
    """The whole-block path in float64 equals the submodule path (each checked above) and is
    float64 through and through."""
    blk = fc.FusedCheckpointedBlock(64, 2, 32, 1, bias=True, backend=backend).to(dtype=torch.float64)
    x = torch.randn(2, 4, 64, dtype=torch.float64, requires_grad=True)
    y = blk(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *blk.parameters()], g)
    blk.recompute = None
    y_ref = blk(x)
    ref_grads = torch.autograd.grad(y_ref, [x, *blk.parameters()], g)
    assert_fp64_close(y, y_ref, "y", rel=1e-12)
    for (name, _), a, r in zip([("x", x), *blk.named_parameters()], grads, ref_grads):
        if name.endswith("layernorm.weight") or name.endswith(".bias") or r.abs().max() > 0:
            assert_fp64_close(a, r, name, rel=1e-12)


def test_float64_bias_grads_accumulate_in_float64():
    """Bias gradients of float64 parameters are float64 sums (they were fp32 sums, 4e-7 off),
    the multi-chunk FFN's weight gradients float64 accumulations."""
    x = torch.randn(3, 4, 16, dtype=torch.float64, requires_grad=True)
    w1, b1, w2, b2 = (_leaf(t) for t in _ffn_params())
    y = fc.fused_ffn(x, w1, b1, w2, b2, "swiglu", chunk_tokens=5, backend="aten")
    g = torch.randn_like(y) * 100
    y.backward(g)
    assert_fp64_close(b2.grad, g.sum((0, 1)), "fc2.bias", rel=1e-13)
    from fused_ckpt.reference import ffn_reference
    ref = [_leaf(t) for t in (x, w1, b1, w2, b2)]
    ffn_reference(*ref, activation="swiglu").backward(g)
    for name, a, r in zip(("x", "fc1.weight", "fc1.bias", "fc2.weight"), (x, w1, b1, w2), ref):
        assert_fp64_close(a.grad, r.grad, name, rel=1e-12)

    xa = torch.randn(2, 4, 64, dtype=torch.float64, requires_grad=True)
    p = [_leaf(t) for t in _block_params()]
    y = fc.fused_attention_block(xa, *p, 2, 1, rope_theta=1e4, backend="aten")
    g = torch.randn_like(y) * 100
    y.backward(g)
    assert_fp64_close(p[7].grad, g.sum((0, 1)), "o_proj.bias", rel=1e-13)
    ref = [_leaf(t) for t in (xa, *p)]
    ref_attention_block(*ref, 2, 1, 1e4).backward(g)
    for name, i in (("q_proj.bias", 1), ("k_proj.bias", 3), ("v_proj.bias", 5)):
        assert_fp64_close(p[i].grad, ref[i + 1].grad, name, rel=1e-12)


# --------------------------------------------------------------------------- item 6: empty inputs
def _check_empty_grads(x, out, params):
    """Backward of an empty output: x's gradient has x's shape (empty), parameters get zeros."""
    out.backward(torch.randn_like(out))
    assert x.grad is not None and x.grad.shape == x.shape
    for name, p in params:
        assert p.grad is not None and p.grad.shape == p.shape, name
        assert (p.grad == 0).all(), name


EMPTY_SHAPES = [(0, 3), (2, 0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recompute", ["all", "qkv", False])
@pytest.mark.parametrize("B,S", EMPTY_SHAPES)
def test_attention_module_empty(B, S, recompute, backend):
    m = fc.FusedCheckpointedAttention(64, 2, 1, bias=True, rope_theta=1e4, recompute=recompute,
                                      backend=backend)
    x = torch.randn(B, S, 64, requires_grad=True)
    y = m(x)
    assert y.shape == (B, S, 64)
    _check_empty_grads(x, y, m.named_parameters())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recompute", ["full", None])
@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("B,S", EMPTY_SHAPES)
def test_block_empty(B, S, norm, recompute, backend):
    blk = fc.FusedCheckpointedBlock(64, 2, 32, 1, norm=norm, bias=True, recompute=recompute,
                                    backend=backend)
    x = torch.randn(B, S, 64, requires_grad=True)
    y = blk(x)
    assert y.shape == (B, S, 64)
    _check_empty_grads(x, y, blk.named_parameters())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,S_q,S_kv", [(0, 3, 3), (1, 0, 3), (1, 3, 0), (1, 0, 0)])
def test_flash_attention_empty(B, S_q, S_kv, backend):
    q = torch.randn(B, S_q, 2, 32, requires_grad=True)
    k = torch.randn(B, S_kv, 2, 32, requires_grad=True)
    v = torch.randn(B, S_kv, 2, 32, requires_grad=True)
    o = fc.flash_attention(q, k, v, backend=backend)
    assert o.shape == q.shape and (o == 0).all()
    o.backward(torch.randn_like(o))
    for t in (q, k, v):
        assert t.grad.shape == t.shape and (t.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recompute", [True, False, "none"])
def test_ffn_empty_tokens(recompute, backend):
    m = fc.FusedCheckpointedFFN(16, 24, "swiglu", recompute=recompute, backend=backend)
    x = torch.randn(0, 5, 16, requires_grad=True)
    y = m(x)
    assert y.shape == (0, 5, 16)
    _check_empty_grads(x, y, m.named_parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ffn_zero_width_is_refused(backend):
    x = torch.randn(3, 0)
    w1, w2 = torch.randn(8, 0), torch.randn(0, 8)
    with pytest.raises(ValueError, match="d_model=0"):
        fc.fused_ffn(x, w1, None, w2, None, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Norm", [fc.FusedRMSNorm, fc.FusedLayerNorm])
def test_norm_empty_rows(Norm, backend):
    m = Norm(32, backend=backend)
    x = torch.randn(2, 0, 32, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    _check_empty_grads(x, y, m.named_parameters())


@pytest.mark.parametrize("activation", ["gelu", "swiglu", "geglu_tanh", "relu", "silu"])
def test_aten_ffn_float64_without_the_extension(activation, monkeypatch):
    """float64 on CUDA: the csrc CUDA kernels take no float64, so the aten FFN uses PyTorch
    math for the activation there; the same path (forced here on the CPU) is exact."""
    import fused_ckpt.ops._ffn_backends as ffn_backends
    from fused_ckpt.reference import ffn_reference

    monkeypatch.setattr(ffn_backends, "_ext_takes", lambda z: False)
    gated = activation in ("swiglu", "geglu_tanh")
    x = torch.randn(5, 16, dtype=torch.float64)
    w1, b1 = torch.randn(48 if gated else 24, 16, dtype=torch.float64) / 4, torch.randn(48 if gated else 24,
                                                                                        dtype=torch.float64)
    w2, b2 = torch.randn(16, 24, dtype=torch.float64) / 5, torch.randn(16, dtype=torch.float64)
    for recompute in (True, "none"):
        leaves = [_leaf(t) for t in (x, w1, b1, w2, b2)]
        y = fc.fused_ffn(*leaves, activation=activation, recompute=recompute, backend="aten")
        g = torch.randn_like(y)
        grads = torch.autograd.grad(y, leaves, g)
        ref_leaves = [_leaf(t) for t in (x, w1, b1, w2, b2)]
        ref = ffn_reference(*ref_leaves, activation=activation)
        ref_grads = torch.autograd.grad(ref, ref_leaves, g)
        assert_fp64_close(y, ref, "y")
        for i, (a, r) in enumerate(zip(grads, ref_grads)):
            assert_fp64_close(a, r, f"grad {i}")
