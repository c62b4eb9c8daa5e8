"""flash_attention: output and gradients against a float64 reference (FlashAttention's 2x rule),
masks, GQA, ragged lengths, the aten path, custom-op registration and input errors."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fused_ckpt.ops.attention as attention_ops
from fused_ckpt.functional_attention import flash_attention
from fused_ckpt.ops.attention import AtenAttention, flash_attn_backward, flash_attn_forward

from .conftest import DEVICE, TRITON_OK
from .helpers import SavedTensors, assert_close_by_rule, deterministic

DEV = DEVICE
needs_triton = pytest.mark.triton  # conftest: on CUDA tensors with a GPU, skipped without GPU or interpreter


def math_attention(q, k, v, causal=False, scale=None, key_padding_mask=None):
    """PyTorch math attention in the inputs' dtype (softmax in fp32, rounded, as eager
    attention does); rows that see no key give 0. float64 inputs: the reference."""
    B, S_q, H, D = q.shape
    S_kv, H_kv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k.repeat_interleave(H // H_kv, 2)
    v = v.repeat_interleave(H // H_kv, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    keep = torch.ones(S_q, S_kv, dtype=torch.bool, device=q.device)
    if causal:
        keep = torch.arange(S_kv, device=q.device)[None, :] <= torch.arange(S_q, device=q.device)[:, None] + S_kv - S_q
    keep = keep[None, None]
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :]
    s = s.masked_fill(~keep, float("-inf"))
    soft_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    p = torch.softmax(s, -1, dtype=soft_dtype).nan_to_num(0.0).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def _inputs(B, S_q, S_kv, H, H_kv, D, dtype, device=DEV):
    q = torch.randn(B, S_q, H, D, device=device, dtype=dtype)
    k = torch.randn(B, S_kv, H_kv, D, device=device, dtype=dtype)
    v = torch.randn(B, S_kv, H_kv, D, device=device, dtype=dtype)
    return q, k, v


def check_against_reference(q, k, v, causal, kpm=None, scale=None, backend="auto"):
    """Output and dq, dk, dv (random upstream gradient) by the 2x-PyTorch-error rule."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = flash_attention(*leaves, causal=causal, scale=scale, key_padding_mask=kpm, backend=backend)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)

    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = math_attention(*ref_leaves, causal=causal, scale=scale, key_padding_mask=kpm)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    pt_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    pt = math_attention(*pt_leaves, causal=causal, scale=scale, key_padding_mask=kpm)
    pt_grads = torch.autograd.grad(pt, pt_leaves, dout)

    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close_by_rule(out, ref, pt, "out")
    for name, g, r, p in zip(("dq", "dk", "dv"), grads, ref_grads, pt_grads):
        assert g.shape == r.shape and g.dtype == q.dtype, name
        if not r.any():  # e.g. dq with a single key: softmax is constant, dq = 0 exactly
            assert g.abs().max() <= 16 * torch.finfo(g.dtype).eps, f"{name}: {g.abs().max()} != 0"
            continue
        assert_close_by_rule(g, r, p, name)
    return out, grads


# (B, S_q, S_kv, H, H_kv, D, causal, dtype): seqlens 1, 17, 130; q_len != kv_len both ways;
# head dims 32/64/128/256; MHA, GQA and MQA; fp32, bf16 and fp16.
CASES = [
    (2, 17, 17, 2, 2, 32, False, torch.float32),
    (2, 17, 17, 4, 2, 32, True, torch.bfloat16),
    (1, 130, 130, 2, 1, 64, True, torch.bfloat16),
    (1, 130, 130, 2, 2, 64, False, torch.float16),
    (1, 1, 1, 2, 2, 32, True, torch.float32),
    (2, 1, 17, 4, 1, 32, True, torch.bfloat16),
    (1, 40, 97, 4, 2, 128, True, torch.float32),
    (1, 97, 40, 2, 2, 64, True, torch.bfloat16),
    (1, 33, 65, 2, 2, 128, False, torch.bfloat16),
    (1, 17, 17, 1, 1, 256, True, torch.float32),
]


@needs_triton
@pytest.mark.parametrize("B,S_q,S_kv,H,H_kv,D,causal,dtype", CASES,
                         ids=[f"b{c[0]}-q{c[1]}-kv{c[2]}-h{c[3]}/{c[4]}-d{c[5]}-{'causal' if c[6] else 'full'}-"
                              f"{str(c[7])[6:]}" for c in CASES])
def test_matches_reference(B, S_q, S_kv, H, H_kv, D, causal, dtype):
    check_against_reference(*_inputs(B, S_q, S_kv, H, H_kv, D, dtype), causal, backend="triton")


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_key_padding_mask(causal, dtype):
    B, S_q, S_kv = 3, 37, 45
    q, k, v = _inputs(B, S_q, S_kv, 2, 1, 32, dtype)
    kpm = torch.rand(B, S_kv, device=DEV) > 0.3
    kpm[0, :] = True
    kpm[1, 20:] = False  # right padding
    kpm[2, :] = False  # a sequence with three keys (causal: queries before key 13 see none)
    kpm[2, [13, 22, 40]] = True
    check_against_reference(q, k, v, causal, kpm, scale=0.3, backend="triton")


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "aten"])
def test_fully_masked_rows_are_zero(backend):
    B, S = 2, 20
    q, k, v = _inputs(B, S, S, 2, 2, 32, torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    kpm = torch.ones(B, S, dtype=torch.bool, device=DEV)
    kpm[1] = False  # batch 1: every key padded
    out = flash_attention(q, k, v, key_padding_mask=kpm, backend=backend)
    assert torch.isfinite(out).all()
    assert (out[1] == 0).all() and out[0].abs().sum() > 0
    out.backward(torch.randn_like(out))
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
        assert (t.grad[1] == 0).all()
    # causal with more queries than keys: the first S_q - S_kv queries see no key
    q2, k2, v2 = (t.detach().requires_grad_() for t in _inputs(1, 30, 10, 2, 2, 32, torch.bfloat16))
    out2 = flash_attention(q2, k2, v2, causal=True, backend=backend)
    assert torch.isfinite(out2).all() and (out2[:, :20] == 0).all() and (out2[:, 20:] != 0).any()
    out2.float().sum().backward()
    assert torch.isfinite(q2.grad).all() and (q2.grad[:, :20] == 0).all()
    _, lse = flash_attn_forward(q2.detach(), k2.detach(), v2.detach(), None, True, 0.2, backend)
    assert lse.dtype == torch.float32 and (lse[..., :20] == float("-inf")).all() and torch.isfinite(lse[..., 20:]).all()


@pytest.mark.parametrize("causal", [False, True])
def test_aten_backend_matches_reference(causal):
    q, k, v = _inputs(2, 19, 23, 4, 2, 64, torch.bfloat16)
    kpm = torch.rand(2, 23, device=DEV) > 0.2
    check_against_reference(q, k, v, causal, kpm, backend="aten")


def test_aten_gradcheck_float64():
    q, k, v = (t.requires_grad_() for t in _inputs(1, 5, 7, 2, 1, 32, torch.float64, device="cpu"))
    kpm = torch.tensor([[True, True, False, True, True, True, False]])
    fn = lambda q, k, v: flash_attention(q, k, v, causal=True, key_padding_mask=kpm, backend="aten")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


class _AtenOps(TorchDispatchMode):
    """Records the names of the aten ops run under it."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


CPU_FLASH_OPS = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"}
CPU_FLASH_FWD = {"_scaled_dot_product_flash_attention_for_cpu"}

# (B, S_q, S_kv, H, H_kv, causal, key padding)
FUSED_CASES = {
    "gqa": (2, 33, 33, 4, 2, False, None),
    "key-padding": (3, 37, 45, 2, 1, False, "random"),
    "causal-square-gqa": (1, 130, 130, 8, 2, True, None),
    "causal-left-padded": (2, 40, 40, 4, 2, True, "left"),  # batch 1: its first 13 queries see no key
    "causal-more-queries": (1, 30, 10, 2, 2, True, None),  # the first 20 queries see no key
    "causal-fewer-queries": (1, 20, 50, 4, 1, True, "random"),  # bottom-right: an explicit mask
    "q1": (2, 1, 17, 4, 1, True, "random"),
    "masked-batch": (2, 20, 20, 2, 2, False, "batch"),  # batch 1: every key padded
}


def _aten_attention(q, k, v, kpm, causal, scale, do):
    """AtenAttention forward then backward: (o, lse, dq, dk, dv) and the names of the aten ops run."""
    with _AtenOps() as ops:
        o, lse = AtenAttention.forward(q, k, v, kpm, causal, scale)
        grads = AtenAttention.backward(do, q, k, v, o, lse, kpm, causal, scale, True, True)
    return (o, lse, *grads), ops.names


def _reference_lse(q, k, kpm, causal, scale):
    """float64 log-sum-exp [B, H, S_q] of the visible scaled scores (-inf: no visible key)."""
    S_q, H, S_kv = q.shape[1], q.shape[2], k.shape[1]
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double().repeat_interleave(H // k.shape[2], 2)) * scale
    keep = torch.ones(S_q, S_kv, dtype=torch.bool)
    if causal:
        keep = torch.arange(S_kv)[None, :] <= torch.arange(S_q)[:, None] + S_kv - S_q
    if kpm is not None:
        keep = keep & kpm[:, None, None, :]
    return s.masked_fill(~keep, float("-inf")).logsumexp(-1)


@pytest.mark.skipif(not attention_ops._CPU_FLASH_TORCH, reason="the fused CPU path needs torch >= 2.9")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_aten_cpu_fused_path(case, dtype, monkeypatch):
    """The aten backend's forward runs PyTorch's fused CPU flash kernel, its backward the math
    path (never the fused CPU backward kernel: its fp32 error is up to ~3x eager's), and o, lse,
    dq, dk, dv match the math path alone by the 2x rule against float64; rows without a visible
    key are exactly 0 with lse -inf."""
    B, S_q, S_kv, H, H_kv, causal, padding = FUSED_CASES[case]
    q, k, v = _inputs(B, S_q, S_kv, H, H_kv, 64, dtype, device="cpu")
    kpm = None if padding is None else torch.rand(B, S_kv) > 0.3
    if padding == "left":
        kpm[:] = True
        kpm[1, :13] = False
    elif padding == "batch":
        kpm[:] = True
        kpm[1] = False
    scale, do = 0.125, torch.randn_like(q)

    assert attention_ops._use_cpu_flash(q, k)
    fused, ops = _aten_attention(q, k, v, kpm, causal, scale, do)
    assert CPU_FLASH_OPS & ops == CPU_FLASH_FWD
    monkeypatch.setattr(attention_ops, "_use_cpu_flash", lambda q, k: False)
    math_path, ops = _aten_attention(q, k, v, kpm, causal, scale, do)
    assert not CPU_FLASH_OPS & ops

    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_o = math_attention(*leaves, causal=causal, scale=scale, key_padding_mask=kpm)
    ref = (ref_o, _reference_lse(q, k, kpm, causal, scale), *torch.autograd.grad(ref_o, leaves, do.double()))
    dead = ref[1] == float("-inf")  # [B, H, S_q]
    assert dead.any() == (case in ("causal-left-padded", "causal-more-queries", "masked-batch"))
    for name, got, mp, r in zip(("o", "lse", "dq", "dk", "dv"), fused, math_path, ref):
        assert got.dtype == mp.dtype and got.shape == mp.shape and got.is_contiguous(), name
        if name == "lse":
            assert torch.equal(got == float("-inf"), dead)
            got, mp, r = got[~dead], mp[~dead], r[~dead]
        elif name in ("o", "dq"):
            assert (got.transpose(1, 2)[dead] == 0).all(), f"{name}: rows without a visible key are not 0"
        assert_close_by_rule(got, r, mp, name)


@needs_triton
def test_triton_and_aten_agree_fp32():
    q, k, v = _inputs(1, 50, 50, 2, 1, 64, torch.float32)
    a = flash_attention(q, k, v, causal=True, backend="triton")
    b = flash_attention(q, k, v, causal=True, backend="aten")
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@needs_triton
def test_deterministic_backward():
    """Under torch.use_deterministic_algorithms the backward is bitwise reproducible (the
    default single pass accumulates dQ with fp32 atomics, whose order varies on a GPU)."""
    q, k, v = _inputs(2, 70, 70, 4, 1, 32, torch.bfloat16)
    dout = torch.randn_like(q)

    def grads():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(flash_attention(*leaves, causal=True), leaves, dout)

    with deterministic():
        for a, b in zip(grads(), grads()):
            assert torch.equal(a, b)


@needs_triton
def test_non_contiguous_inputs_and_saved_tensors():
    B, S, H, D = 2, 21, 2, 32
    qkv = torch.randn(B, S, 3, H, D, device=DEV, requires_grad=True)
    q, k, v = qkv.unbind(2)  # strided views, as from a packed projection
    with SavedTensors() as st:
        out = flash_attention(q, k, v, causal=True)
    expected = 3 * q.numel() * 4 + out.numel() * 4 + B * H * S * 4  # q, k, v, o, fp32 lse
    assert st.total_bytes([]) == expected
    out.sum().backward()
    ref = math_attention(*(t.detach().double() for t in (q, k, v)), causal=True)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(qkv.grad).all()


@needs_triton
def test_frozen_inputs_compute_only_needed_grads():
    q, k, v = _inputs(1, 17, 17, 2, 2, 32, torch.float32)
    q.requires_grad_()
    out = flash_attention(q, k, v, causal=True)
    (dq,) = torch.autograd.grad(out, q, torch.ones_like(out))
    assert torch.isfinite(dq).all()


def test_zero_length_sequences():
    q, k, v = _inputs(2, 0, 5, 2, 2, 32, torch.float32)
    assert flash_attention(q, k, v, backend="aten").shape == q.shape
    q, k, v = (t.requires_grad_() for t in _inputs(1, 4, 0, 2, 2, 32, torch.float32))
    out = flash_attention(q, k, v, backend="aten")
    assert (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "aten"])
def test_opcheck(backend):
    q, k, v = (t.requires_grad_() for t in _inputs(1, 17, 17, 2, 1, 32, torch.float32))
    kpm = torch.rand(1, 17, device=DEV) > 0.2
    torch.library.opcheck(flash_attn_forward, (q, k, v, kpm, True, 0.25, backend))
    o, lse = flash_attn_forward(q.detach(), k.detach(), v.detach(), kpm, True, 0.25, backend)
    do = torch.randn_like(o)
    torch.library.opcheck(flash_attn_backward,
                          (do, q.detach(), k.detach(), v.detach(), o, lse, kpm, True, 0.25, [True, False, True], backend))


def test_bad_inputs():
    q, k, v = _inputs(1, 8, 8, 4, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="head_dim"):
        flash_attention(*_inputs(1, 8, 8, 2, 2, 48, torch.float32), backend="aten")
    with pytest.raises(ValueError, match="divide"):
        flash_attention(*_inputs(1, 8, 8, 4, 3, 32, torch.float32), backend="aten")
    with pytest.raises(ValueError, match="same shape"):
        flash_attention(q, k, v[:, :7], backend="aten")
    with pytest.raises(ValueError, match="4-D"):
        flash_attention(q[0], k, v, backend="aten")
    with pytest.raises(ValueError, match="batch and head_dim"):
        flash_attention(q, *_inputs(2, 8, 8, 4, 2, 32, torch.float32)[1:], backend="aten")
    with pytest.raises(TypeError, match="share one dtype"):
        flash_attention(q, k.half(), v, backend="aten")
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        flash_attention(q.long(), k.long(), v.long(), backend="aten")
    if TRITON_OK:  # without CUDA or the interpreter backend='triton' refuses before the dtype check
        with pytest.raises(TypeError, match="float64"):
            flash_attention(q.double(), k.double(), v.double(), backend="triton")
    with pytest.raises(ValueError, match="one device"):
        flash_attention(q, k.to("meta"), v, backend="aten")
    with pytest.raises(TypeError, match="bool"):
        flash_attention(q, k, v, key_padding_mask=torch.ones(1, 8, device=DEV), backend="aten")
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        flash_attention(q, k, v, key_padding_mask=torch.ones(1, 7, dtype=torch.bool, device=DEV), backend="aten")
    with pytest.raises(ValueError, match="scale"):
        flash_attention(q, k, v, scale=float("nan"), backend="aten")
    with pytest.raises(ValueError, match="unknown backend"):
        flash_attention(q, k, v, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_matches_eager_gpu(dtype):
    q, k, v = _inputs(2, 300, 300, 8, 2, 128, dtype, device="cuda")
    kpm = torch.rand(2, 300, device="cuda") > 0.1
    fn = lambda q, k, v: flash_attention(q, k, v, causal=True, key_padding_mask=kpm)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    leaves_e = [t.clone().requires_grad_() for t in (q, k, v)]
    leaves_c = [t.clone().requires_grad_() for t in (q, k, v)]
    with deterministic():  # bitwise comparison: no dQ atomics
        out_e, out_c = fn(*leaves_e), compiled(*leaves_c)
        dout = torch.randn_like(out_e)
        out_e.backward(dout)
        out_c.backward(dout)
    assert torch.equal(out_e, out_c)
    for a, b in zip(leaves_e, leaves_c):
        assert torch.equal(a.grad, b.grad)
    check_against_reference(q, k, v, True, kpm)


def _count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def test_flop_formulas():
    """The custom ops' registered FLOPs: the forward equals the counted GEMMs of the math
    attention; causal counts the visible pairs; the backward is 2.5x the forward (one pass), 3.5x
    for the deterministic Triton backward's two kernels."""
    q, k, v = (t.requires_grad_() for t in _inputs(2, 12, 20, 4, 2, 32, torch.float32, device="cpu"))
    fwd = _count_flops(lambda: flash_attention(q, k, v, backend="aten"))
    assert fwd == _count_flops(lambda: math_attention(q, k, v)) == 4 * 2 * 4 * 12 * 20 * 32
    visible = sum(min(20, i + 8 + 1) for i in range(12))  # bottom-right causal, 12 queries, 20 keys
    assert _count_flops(lambda: flash_attention(q, k, v, causal=True, backend="aten")) == 4 * 2 * 4 * visible * 32
    total = _count_flops(lambda: flash_attention(q, k, v, backend="aten").sum().backward())
    assert total == fwd + 5 * fwd // 2
    if TRITON_OK:
        qd, kd, vd = (t.detach().to(DEV).requires_grad_() for t in (q, k, v))
        total = _count_flops(lambda: flash_attention(qd, kd, vd, backend="triton").sum().backward())
        assert total == fwd + 5 * fwd // 2
        with deterministic():
            total = _count_flops(lambda: flash_attention(qd, kd, vd, backend="triton").sum().backward())
        assert total == fwd + 7 * fwd // 2


def test_head_dims_constant_matches_kernels():
    from fused_ckpt.functional_attention import HEAD_DIMS
    from fused_ckpt.kernels.flash_attn_fwd import HEAD_DIMS as KERNEL_HEAD_DIMS

    assert HEAD_DIMS == KERNEL_HEAD_DIMS

