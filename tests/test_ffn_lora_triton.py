"""The LoRA FFN on the Triton backend: the low-rank terms inside the fused FFN kernels.

fused_ffn(lora=..., backend="triton") runs ``_ffn_up_kernel`` / ``_gemm_kernel`` (fc2) /
``_ffn_bwd_hidden_kernel`` with HAS_LORA (the ``scaling * t B^T`` terms, and the fc2 adapter's
``drop'(scaling (dY B) A)`` in dH, formed in the kernels' accumulators). Checked against a float64
PyTorch LoRA FFN with the op's dropout masks and random upstream gradients: y, dx and every dA /
dB by the 2x rule (tests/helpers.py), for ranks 1, 8 and 20 (one, one padded and two 16-wide
steps of the kernels' r loop), gated (packed and separate up weight) and ungated, recompute and
saved-z modes, several token chunks (the fc2 mask's row offset), non-contiguous dy.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from .helpers import SavedTensors, assert_close_by_rule

pytestmark = pytest.mark.triton

M_TOKENS, D, FF = 37, 24, 40  # 37 tokens: chunks of 24 -> two chunks, the second one ragged
CHUNK = 24


def _case(activation, layout, r, keys, dtype, fdtype, seed=0):
    """(base tensors, lora {key: (A, B, scaling)}, x, g) in float64; the test casts them."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s, k=1.0: (torch.randn(*s, generator=gen, dtype=torch.float64) * k)  # noqa: E731
    gated = activation != "gelu"
    f1 = 2 * FF if gated and layout == "packed" else FF
    base = {"w1": rnd(f1, D, k=0.2), "b1": rnd(f1, k=0.2), "w2": rnd(D, FF, k=0.2), "b2": rnd(D, k=0.2),
            "w_up": rnd(FF, D, k=0.2) if layout == "separate" else None,
            "b_up": rnd(FF, k=0.2) if layout == "separate" else None}
    shapes = {"fc1": (D, f1), "up": (D, FF), "fc2": (FF, D)}
    scal = {"fc1": 0.5, "up": 2.0, "fc2": 1.5}
    lora = {k: (rnd(r, shapes[k][0], k=0.3), rnd(shapes[k][1], r, k=0.3), scal[k]) for k in keys}
    x = rnd(1, M_TOKENS, D)
    g = rnd(M_TOKENS, D)
    return base, lora, x, g


def _leaves(base, lora, x, dtype, fdtype):
    b = {k: (v.to(dtype) if v is not None else None) for k, v in base.items()}
    leaf = lambda t, dt: t.detach().to(dt).requires_grad_()  # noqa: E731  (a new leaf, also in float64)
    fdt = fdtype if isinstance(fdtype, dict) else dict.fromkeys(lora, fdtype)  # per adapter, or one for all
    lo = {k: (leaf(a, fdt[k]), leaf(bb, fdt[k]), s) for k, (a, bb, s) in lora.items()}
    return b, lo, leaf(x, dtype)


def _grads(y, g, noncontig, xs, lo):
    gy = g.to(y.dtype)
    if noncontig:  # the same values through a transposed (non-contiguous) view
        gy = gy.t().contiguous().t()
        assert not gy.is_contiguous()
    y.backward(gy.view(y.shape))
    out = {"x": xs.grad}
    for k, (a, b, _) in lo.items():
        out[f"{k}.A"], out[f"{k}.B"] = a.grad, b.grad
    return out


def _reference(base, lora, x, g, dtype, fdtype, activation, p, seed, offset):
    """The LoRA FFN as PEFT computes it (base in ``dtype``, adapters in ``fdtype``, their sum
    rounded once), with the op's dropout masks (one per projection, offsets 0/1/2)."""
    from fused_ckpt.activations import get_activation
    from fused_ckpt.ops.ffn_lora import _keep

    b, lo, xs = _leaves(base, lora, x, dtype, fdtype)
    x2 = xs.reshape(-1, D)

    def proj(inp, w, bias, key, i):
        out = F.linear(inp, w, bias)
        if key not in lo:
            return out
        a, bb, s = lo[key]
        dropped = inp if not p else inp * _keep(seed, offset + i, p, 0, M_TOKENS, inp.shape[1], inp.device) / (1 - p)
        term = s * (dropped.to(a.dtype) @ a.t()) @ bb.t()
        return (out.to(a.dtype) + term).to(dtype)

    z = proj(x2, b["w1"], b["b1"], "fc1", 0)
    if b["w_up"] is not None:
        z = torch.cat([z, proj(x2, b["w_up"], b["b_up"], "up", 1)], -1)
    h = get_activation(activation).hidden(z)
    y = proj(h, b["w2"], b["b2"], "fc2", 2).view(xs.shape)
    return y, xs, lo


def _run_triton(base, lora, x, dtype, fdtype, activation, recompute, p, chunk=CHUNK, leaves=None):
    from fused_ckpt.functional import fused_ffn

    b, lo, xs = leaves or _leaves(base, lora, x, dtype, fdtype)
    y = fused_ffn(xs, b["w1"], b["b1"], b["w2"], b["b2"], activation, recompute, chunk_tokens=chunk,
                  backend="triton", w_up=b["w_up"], b_up=b["b_up"], lora=lo, lora_dropout=p)
    return y, xs, lo


# The interpreter's fp32 -> bf16 cast truncates instead of rounding to nearest (triton 3.6 and
# 3.9; see tests/test_ffn.py), so a kernel's bf16 outputs (z, h, dZ) carry up to one ulp where
# PyTorch's carry half: the 2x rule then fails by chance (seed 3 of the bf16 / fp32-factor case:
# dA_2 at 3x PyTorch's error, all of it the truncated h). bf16 runs compiled, on a GPU.
BF16_ON_GPU = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                 reason="the Triton interpreter truncates fp32 -> bf16 casts")

CASES = [  # activation, layout, r, adapters, p, recompute, dtype, factor dtype, non-contiguous dy
    ("swiglu", "packed", 8, ("fc1", "fc2"), 0.25, True, torch.float32, torch.float32, True),
    ("swiglu", "separate", 20, ("fc1", "up", "fc2"), 0.25, False, torch.float32, torch.float32, False),
    ("swiglu", "separate", 1, ("up", "fc2"), 0.0, True, torch.float16, torch.float16, True),
    ("geglu", "separate", 8, ("fc1", "up"), 0.3, True, torch.float16, torch.float32, False),
    ("geglu", "packed", 20, ("fc1",), 0.0, False, torch.bfloat16, torch.bfloat16, False),
    ("gelu", None, 1, ("fc1", "fc2"), 0.25, True, torch.float32, torch.float32, False),
    ("gelu", None, 20, ("fc1", "fc2"), 0.0, True, torch.float16, torch.float16, True),
    ("gelu", None, 8, ("fc2",), 0.25, False, torch.bfloat16, torch.float32, True),
    ("swiglu", "packed", 8, ("fc1", "fc2"), 0.25, True, torch.bfloat16, torch.bfloat16, False),
    # adapters in two dtypes (both allowed over fp16): the kernels read both sides as fp32
    ("swiglu", "separate", 8, ("fc1", "up"), 0.0, True, torch.float16,
     {"fc1": torch.float32, "up": torch.float16}, False),
]


@pytest.mark.parametrize("activation,layout,r,keys,p,recompute,dtype,fdtype,noncontig", [
    pytest.param(*c, marks=[BF16_ON_GPU] if c[6] == torch.bfloat16 else [],
                 id=f"{c[0]}-{c[1]}-r{c[2]}-{'+'.join(c[3])}-p{c[4]}-rc{c[5]}-{str(c[6])[6:]}-"
                    f"{str(c[7])[6:] if not isinstance(c[7], dict) else 'mixed'}{'-nc' if c[8] else ''}")
    for c in CASES])
def test_triton_lora_matches_float64(activation, layout, r, keys, p, recompute, dtype, fdtype, noncontig):
    """y, dx and every adapter's dA / dB of the Triton LoRA FFN against float64 (2x PyTorch's own
    error in the same dtypes), with the same replayed dropout masks."""
    from fused_ckpt.ops.attention import draw_dropout_seed

    base, lora, x, g = _case(activation, layout, r, keys, dtype, fdtype)
    torch.manual_seed(5)
    y, xs, lo = _run_triton(base, lora, x, dtype, fdtype, activation, recompute, p)
    got = _grads(y, g, noncontig, xs, lo)
    torch.manual_seed(5)
    seed, offset = draw_dropout_seed() if p else (0, 0)
    ref = {}
    for name, dt, fdt in (("want", torch.float64, torch.float64), ("pt", dtype, fdtype)):
        ry, rxs, rlo = _reference(base, lora, x, g, dt, fdt, activation, p, seed, offset)
        ref[name] = (ry, _grads(ry, g, False, rxs, rlo))
    assert_close_by_rule(y, ref["want"][0], ref["pt"][0], "y")
    assert set(got) == {"x"} | {f"{k}.{m}" for k in keys for m in "AB"}
    for k in got:
        assert got[k].dtype == (dtype if k == "x" else fdtype[k[:-2]] if isinstance(fdtype, dict) else fdtype)
        assert_close_by_rule(got[k], ref["want"][1][k], ref["pt"][1][k], k)
    if p:  # the masks matter: the same FFN without dropout differs
        y0, _, _ = _reference(base, lora, x, g, torch.float64, torch.float64, activation, 0.0, 0, 0)
        assert (y0 - ref["want"][0]).abs().max() > 1e-2


def _record_launches(monkeypatch):
    """(kernel name, HAS_LORA) of every Triton launch of the FFN kernels."""
    from fused_ckpt.kernels import _common, ffn_bwd, ffn_fwd, matmul

    seen = []

    def recording(kernel, grid, *args, **kwargs):
        seen.append((_common._kernel_name(kernel), kwargs.get("HAS_LORA")))
        return _common.launch(kernel, grid, *args, **kwargs)

    for mod in (ffn_fwd, ffn_bwd, matmul):
        monkeypatch.setattr(mod, "launch", recording)
    return seen


@pytest.mark.parametrize("recompute", [True, False])
def test_triton_lora_runs_the_fused_kernels(monkeypatch, recompute):
    """The Triton LoRA FFN launches the fused kernels with HAS_LORA (fc1 / up in the up-projection
    kernel, fc2 in the fc2 GEMM, and the backward's hidden kernel) and the LoRA dropout kernel,
    and never the torch path that forms z with torch GEMMs nor torch's Philox masks."""
    from fused_ckpt.ops import ffn_lora

    def torch_path(*a, **k):
        raise AssertionError("the torch LoRA path ran on the triton backend")

    monkeypatch.setattr(ffn_lora, "_chunk_z", torch_path)
    monkeypatch.setattr(ffn_lora, "_keep", torch_path)
    seen = _record_launches(monkeypatch)
    base, lora, x, g = _case("swiglu", "separate", 8, ("fc1", "up", "fc2"), torch.float32, torch.float32)
    y, xs, lo = _run_triton(base, lora, x, torch.float32, torch.float32, "swiglu", recompute, 0.25, chunk=0)
    assert set(seen) == {("_ffn_up_kernel", True), ("_gemm_kernel", True), ("_lora_dropout_kernel", None)}
    seen.clear()
    _grads(y, g, False, xs, lo)
    assert set(seen) == {("_ffn_bwd_hidden_kernel", True), ("_lora_dropout_kernel", None)}
    assert seen.count(("_ffn_bwd_hidden_kernel", True)) == 1


def test_triton_lora_keeps_saved_tensors_unchanged():
    """What the op saves (x, the [tokens, r] products) is what ffn_lora_saved_bytes counts and is
    not written after it was saved (compared with copies taken when autograd saved it)."""
    from fused_ckpt.ops.ffn_lora import ffn_lora_saved_bytes

    base, lora, x, g = _case("swiglu", "packed", 8, ("fc1", "fc2"), torch.float32, torch.float32)
    leaves = _leaves(base, lora, x, torch.float32, torch.float32)
    params = [v for v in leaves[0].values() if v is not None] + [t for a, bb, _ in leaves[1].values() for t in (a, bb)]
    with SavedTensors() as s:
        y, xs, lo = _run_triton(base, lora, x, torch.float32, torch.float32, "swiglu", True, 0.25, leaves=leaves)
    copies = [t.detach().clone() for t in s.saved]
    _grads(y, g, False, xs, lo)
    assert all(torch.equal(t, c) for t, c in zip(s.saved, copies))
    assert s.unique_bytes(exclude=params) == ffn_lora_saved_bytes(M_TOKENS, D, (8, 8), 0, 2 * FF, 4)


def test_triton_lora_zero_tokens():
    """No tokens: an empty y and dx, all-zero dA / dB of the factors' shapes."""
    base, lora, x, g = _case("gelu", None, 8, ("fc1", "fc2"), torch.float32, torch.float32)
    b, lo, xs = _leaves(base, lora, x[:, :0], torch.float32, torch.float32)
    from fused_ckpt.functional import fused_ffn

    y = fused_ffn(xs, b["w1"], b["b1"], b["w2"], b["b2"], "gelu", True, backend="triton", lora=lo, lora_dropout=0.25)
    assert y.shape == (1, 0, D)
    y.sum().backward()
    assert xs.grad.shape == xs.shape
    for a, bb, _ in lo.values():
        assert a.grad.shape == a.shape and bb.grad.shape == bb.shape
        assert not a.grad.any() and not bb.grad.any()


def test_lora_op_refuses_an_unknown_backend():
    from fused_ckpt.ops.ffn_lora import ffn_lora_forward_impl

    base, lora, x, _ = _case("gelu", None, 8, ("fc1",), torch.float32, torch.float32)
    a, bb, s = lora["fc1"]
    with pytest.raises(ValueError, match="backend must be 'aten' or 'triton'"):
        ffn_lora_forward_impl(x.float(), base["w1"].float(), None, base["w2"].float(), None, None, None,
                              a.float(), bb.float(), None, None, None, None, [s, 0.0, 0.0], "gelu", 0, 0.0, 0, 0, 0,
                              backend="auto")


@pytest.mark.parametrize("factor,x_dtype,tf32,want", [
    (torch.float32, torch.bfloat16, False, "tf32x3"), (torch.float32, torch.float16, False, "tf32x3"),
    (torch.float32, torch.bfloat16, True, "tf32"), (torch.float32, torch.float32, False, "ieee"),
    (torch.float32, torch.float32, True, "tf32"), (torch.bfloat16, torch.bfloat16, False, None)])
def test_lora_dot_precision_on_a_gpu(monkeypatch, factor, x_dtype, tf32, want):
    """The LoRA dots' precision as a GPU launch picks it: float32 factors over 16-bit inputs take
    tf32x3 (about fp32 accuracy on tensor cores; the IEEE FMA dot spills, tools/aot_compile.py)
    unless torch allows TF32; over fp32 inputs they follow the base GEMM (``dot_flags``)."""
    from fused_ckpt.kernels import _common, matmul

    monkeypatch.setattr(_common, "INTERPRET", False)
    monkeypatch.setattr(matmul, "INTERPRET", False)
    monkeypatch.setattr(_common, "tf32_matmul_allowed", lambda: tf32)
    assert matmul.lora_flags(factor, x_dtype) == {"LORA_F32": False, "LORA_PRECISION": want}


def test_triton_lora_opcheck():
    """opcheck of the op with backend="triton" (schema, fake implementation, autograd registration)."""
    from fused_ckpt.ops.ffn_lora import ffn_lora_forward

    base, lora, x, _ = _case("swiglu", "separate", 8, ("up", "fc2"), torch.float32, torch.float32)
    b, lo, xs = _leaves(base, lora, x, torch.float32, torch.float32)
    factors = [t for key in ("fc1", "up", "fc2") for t in (lo[key][:2] if key in lo else (None, None))]
    scaling = [lo[k][2] if k in lo else 0.0 for k in ("fc1", "up", "fc2")]
    torch.library.opcheck(ffn_lora_forward, (xs, b["w1"], b["b1"], b["w2"], b["b2"], b["w_up"], b["b_up"], *factors,
                                             scaling, "swiglu", 0, 0.2, 123, 4, CHUNK), {"backend": "triton"},
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_bf16_factor_dots_are_exact_products():
    """bf16 LoRA factors in the kernels' r loop (LORA_F32 under the interpreter, whose bf16
    ``tl.dot`` is wrong): z of the up-projection kernel and the fc2 GEMM's output in fp32, with
    ``scaling * t B^T`` from bf16 t and B (the kernel launchers take any factor dtype; the op
    pairs bf16 factors with bf16 inputs, whose stores the interpreter truncates), against
    float64 by the 2x rule."""
    from fused_ckpt.activations import get_activation
    from fused_ckpt.kernels.ffn_fwd import ffn_up
    from fused_ckpt.kernels.matmul import gemm

    gen = torch.Generator().manual_seed(3)
    x, w1, w2 = (torch.randn(*s, generator=gen) for s in ((M_TOKENS, D), (FF, D), (D, FF)))
    t, b1, b2 = (torch.randn(*s, generator=gen).bfloat16() for s in ((M_TOKENS, 20), (FF, 20), (D, 20)))
    h = torch.randn(M_TOKENS, FF, generator=gen)
    _, z = ffn_up(x, w1, None, get_activation("gelu"), True, lora=((t, b1, 0.5), None))
    y = gemm(h, w2.t(), lora=(t, b2, 1.5))
    for got, a, w, lb, s, name in ((z, x, w1, b1, 0.5, "z"), (y, h, w2, b2, 1.5, "y")):
        want = a.double() @ w.double().t() + s * (t.double() @ lb.double().t())
        pt = a @ w.t() + s * (t.float() @ lb.float().t())
        assert_close_by_rule(got, want, pt, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lora_dropout_kernel_draws_the_torch_bits(dtype):
    """The triton backend's LoRA dropout (rows row0.. of a [tokens, n] input, any strides) equals
    the aten backend's ``_drop(t, _keep(...))`` exactly: the same keep bits and the same scaling."""
    from fused_ckpt.kernels.ffn_fwd import lora_dropout
    from fused_ckpt.ops.ffn_lora import _drop, _keep

    gen = torch.Generator().manual_seed(4)
    t = torch.randn(45, 19, generator=gen).to(dtype).t()  # [19, 45], non-contiguous
    seed, offset, p, row0 = 2**40 + 17, 5, 0.3, 1000
    got = lora_dropout(t, p, seed, offset, row0)
    want = _drop(t, _keep(seed, offset, p, row0, row0 + 19, 45, t.device), p)
    assert torch.equal(got, want)
    dropped = (want == 0) & (t != 0)
    assert 0.15 < dropped.float().mean().item() < 0.45  # about p of them dropped
