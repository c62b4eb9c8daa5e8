"""RMSNorm / LayerNorm ops: numerics against float64, both backends, the saved-tensor contract,
re-application from saved statistics, determinism, opcheck, input errors, sm_90 compilation."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fused_ckpt.ops.norm import (layer_norm, layer_norm_apply_stats, norm_saved_bytes, rms_norm,
                                 rms_norm_apply_stats)

from .helpers import SavedTensors, assert_close_by_rule, dtype_eps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["triton", "aten"]
KINDS = ["rms", "ln"]


def _reference(kind, x, w, b, eps, dtype):
    """PyTorch's own norm computed in ``dtype`` (float64: the reference)."""
    x = x.to(dtype)
    w = w.to(dtype) if w is not None else None
    if kind == "rms":
        return F.rms_norm(x, x.shape[-1:], w, eps)
    return F.layer_norm(x, x.shape[-1:], w, b.to(dtype) if b is not None else None, eps)


def _fused(kind, x, w, b, eps, backend):
    if kind == "rms":
        return rms_norm(x, w, eps, backend)
    return layer_norm(x, w, b, eps, backend)


def _grads(kind, x, w, b, g, eps, dtype=None, backend=None):
    """(y, dx, dw, db) of the fused op (``backend``) or of PyTorch in ``dtype``."""
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() if t is not None else None for t in (x, w, b)]
    xl, wl, bl = leaves
    y = _fused(kind, xl, wl, bl, eps, backend) if backend else _reference(kind, xl, wl, bl, eps, dtype)
    y.backward(g.to(y.dtype))
    return (y.detach(),) + tuple(t.grad if t is not None else None for t in leaves)


def _check(got, ref64, pt, name):
    """The 2x rule; a reference that is zero up to float64 rounding (LayerNorm of width 1:
    dx = dw = 0 exactly) must be matched to within one unit of the dtype."""
    if ref64.numel() and ref64.abs().max() <= 1e-10:
        assert got.abs().max().item() <= dtype_eps(got.dtype), f"{name}: expected zeros"
        return
    assert_close_by_rule(got, ref64, pt, name)


def check_norm(kind, x, w, b, eps, backend, g=None):
    """Forward and every gradient of the fused op against float64 by the 2x-PyTorch rule."""
    if g is None:
        g = torch.randn(x.shape, dtype=x.dtype)
    got = _grads(kind, x, w, b, g, eps, backend=backend)
    ref = _grads(kind, x, w, b, g, eps, dtype=torch.float64)
    pt = _grads(kind, x, w, b, g, eps, dtype=x.dtype)
    for name, a, r, p in zip(("y", "dx", "dw", "db"), got, ref, pt):
        if r is not None:
            assert a.dtype == p.dtype, f"{name}: dtype {a.dtype} != {p.dtype}"
            _check(a, r, p, name)
    return got


def _inputs(kind, shape, dtype, weight=True, bias=True):
    N = shape[-1]
    x = (torch.randn(shape) * 2 + 0.3).to(dtype)
    w = (1 + 0.5 * torch.randn(N)).to(dtype) if weight else None
    b = (0.5 * torch.randn(N)).to(dtype) if (bias and kind == "ln") else None
    return x, w, b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [1, 7, 33, 130])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_float64(kind, width, dtype, backend):
    x, w, b = _inputs(kind, (3, 7, width), dtype)  # 3-D, 21 rows: several tiles and programs
    check_norm(kind, x, w, b, 1e-6 if kind == "rms" else 1e-5, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("affine", ["none", "weight", "bias"])
@pytest.mark.parametrize("kind", KINDS)
def test_elementwise_affine_optional(kind, affine, backend):
    if kind == "rms" and affine == "bias":
        pytest.skip("RMSNorm has no bias")
    x, w, b = _inputs(kind, (9, 33), torch.bfloat16, weight=affine == "weight", bias=affine == "bias")
    check_norm(kind, x, w, b, 1e-5, backend)


@pytest.mark.triton
@pytest.mark.parametrize("kind,dtype,width", [("rms", torch.float32, 9000), ("ln", torch.bfloat16, 16384)])
def test_wide_rows_split_backward(kind, dtype, width):
    """Rows wider than the fused backward takes: dx and dw/db are two launches."""
    from fused_ckpt.kernels.norm import FUSED_BWD_MAX_BLOCK_N

    assert width > FUSED_BWD_MAX_BLOCK_N
    x, w, b = _inputs(kind, (5, width), dtype)
    check_norm(kind, x, w, b, 1e-5, "triton")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_one_row_and_zero_rows(kind, backend):
    x, w, b = _inputs(kind, (1, 33), torch.float32)
    check_norm(kind, x, w, b, 1e-5, backend)
    for shape in ((0, 33), (2, 0, 33)):
        x, w, b = _inputs(kind, shape, torch.float32)
        y, dx, dw, db = _grads(kind, x, w, b, torch.randn(shape), 1e-5, backend=backend)
        assert y.shape == shape and dx.shape == shape
        assert torch.equal(dw, torch.zeros(33))
        if b is not None:
            assert torch.equal(db, torch.zeros(33))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_input_and_grad(kind, backend):
    base = torch.randn(4, 33, 10, dtype=torch.bfloat16)
    x = base.transpose(1, 2)  # (4, 10, 33), last-dim stride 10
    assert not x.is_contiguous()
    _, w, b = _inputs(kind, (33,), torch.bfloat16)
    g = torch.randn(10, 4, 66, dtype=torch.bfloat16).transpose(0, 1)[..., ::2]
    check_norm(kind, x, w, b, 1e-5, backend, g=g)
    x2 = torch.randn(6, 80, dtype=torch.float16)[:, 5:38]  # unit column stride, row stride 80
    _, w, b = _inputs(kind, (33,), torch.float16)
    check_norm(kind, x2, w, b, 1e-5, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_saved_tensors_are_x_and_stats(kind, backend):
    """The contract: x and the fp32 statistics, nothing else besides the parameters."""
    x, w, b = _inputs(kind, (3, 5, 40), torch.bfloat16)
    x.requires_grad_()
    params = [t.requires_grad_() for t in (w, b) if t is not None]
    with SavedTensors() as s:
        out = _fused(kind, x, w, b, 1e-5, backend) if kind == "rms" else \
            layer_norm(x, w, b, 1e-5, backend, return_stats=True)
    expect = norm_saved_bytes(15, 40, 2, kind == "ln")
    assert s.total_bytes(params) == expect == x.numel() * 2 + 15 * 4 * (1 if kind == "rms" else 2)
    assert any(t is x for t in s.saved)
    # re-applying saved statistics keeps the same: x and the statistics
    if kind == "rms":
        _, rstd = rms_norm(x, w, 1e-5, backend, return_stats=True)
        with SavedTensors() as s2:
            rms_norm_apply_stats(x, w, rstd, backend)
    else:
        _, mean, rstd = out
        with SavedTensors() as s2:
            layer_norm_apply_stats(x, w, b, mean, rstd, backend)
    assert s2.total_bytes(params) == expect
    with torch.no_grad(), SavedTensors() as s3:
        _fused(kind, x, w, b, 1e-5, backend)
    assert not s3.saved


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_apply_stats_equals_norm(kind, backend):
    """y and every gradient of the re-applied norm equal those of the norm itself (bitwise:
    the same kernels and the same backward), and match float64 by the rule."""
    x, w, b = _inputs(kind, (2, 9, 33), torch.bfloat16)
    g = torch.randn(x.shape, dtype=x.dtype)
    y, dx, dw, db = check_norm(kind, x, w, b, 1e-5, backend, g=g)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    bl = b.clone().requires_grad_() if b is not None else None
    with torch.no_grad():
        if kind == "rms":
            stats = rms_norm(x, w, 1e-5, backend, return_stats=True)[1:]
        else:
            stats = layer_norm(x, w, b, 1e-5, backend, return_stats=True)[1:]
    assert all(s.dtype == torch.float32 and s.shape == x.shape[:-1] and not s.requires_grad for s in stats)
    if kind == "rms":
        ya = rms_norm_apply_stats(xl, wl, stats[0], backend)
    else:
        ya = layer_norm_apply_stats(xl, wl, bl, stats[0], stats[1], backend)
    ya.backward(g)
    assert torch.equal(ya, y) and torch.equal(xl.grad, dx) and torch.equal(wl.grad, dw)
    if b is not None:
        assert torch.equal(bl.grad, db)


@pytest.mark.triton
def test_backends_agree():
    for kind in KINDS:
        x, w, b = _inputs(kind, (13, 130), torch.float32)
        g = torch.randn(x.shape)
        a = _grads(kind, x, w, b, g, 1e-5, backend="triton")
        c = _grads(kind, x, w, b, g, 1e-5, backend="aten")
        for name, u, v in zip("y dx dw db".split(), a, c):
            if u is not None:
                torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.triton
@pytest.mark.parametrize("kind", KINDS)
def test_deterministic(kind):
    """dw/db come from fixed per-program partial sums: bitwise the same on every run."""
    x, w, b = _inputs(kind, (37, 130), torch.bfloat16)  # 37 rows: several programs x tiles
    g = torch.randn(x.shape, dtype=x.dtype)
    first = _grads(kind, x, w, b, g, 1e-5, backend="triton")
    for _ in range(2):
        again = _grads(kind, x, w, b, g, 1e-5, backend="triton")
        assert all(u is None or torch.equal(u, v) for u, v in zip(first, again))


@pytest.mark.triton
@pytest.mark.parametrize("partials", [1, 3, 50])
@pytest.mark.parametrize("kind,width", [("ln", 130), ("rms", 9000)])
def test_any_row_partition(kind, width, partials, monkeypatch):
    """dw/db do not depend on how rows are split over programs (on GPU the split follows the
    SM count and, for wide rows, differs between the dx and dw launches)."""
    import fused_ckpt.kernels.norm as kn

    x, w, b = _inputs(kind, (23, width), torch.float32)
    g = torch.randn(x.shape)
    ref = _grads(kind, x, w, b, g, 1e-5, backend="aten")
    monkeypatch.setattr(kn, "INTERPRET_PARTIALS", partials)
    got = _grads(kind, x, w, b, g, 1e-5, backend="triton")
    for name, u, v in zip("y dx dw db".split(), got, ref):
        if u is not None:
            torch.testing.assert_close(u, v, rtol=2e-5, atol=2e-5, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    ops = torch.ops.fused_ckpt
    x = torch.randn(2, 3, 33, requires_grad=True)
    w = torch.randn(33, requires_grad=True)
    b = torch.randn(33, requires_grad=True)
    dy = torch.randn(2, 3, 33)
    with torch.no_grad():
        _, rstd = ops.rms_norm_forward(x, w, 1e-6, backend)
        _, mean, lrstd = ops.layer_norm_forward(x, w, b, 1e-5, backend)
    cases = [
        (ops.rms_norm_forward, (x, w, 1e-6, backend)),
        (ops.rms_norm_forward, (x, None, 1e-6, backend)),
        (ops.layer_norm_forward, (x, w, b, 1e-5, backend)),
        (ops.layer_norm_forward, (x, None, None, 1e-5, backend)),
        (ops.rms_norm_apply, (x, w, rstd, backend)),
        (ops.layer_norm_apply, (x, w, b, mean, lrstd, backend)),
        (ops.rms_norm_backward, (dy, x.detach(), w.detach(), rstd, [True, True], backend)),
        (ops.layer_norm_backward, (dy, x.detach(), w.detach(), mean, lrstd, [True, False, True], backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_double_backward_raises():
    x, w, _ = _inputs("rms", (4, 33), torch.float32)
    x.requires_grad_()
    (dx,) = torch.autograd.grad(rms_norm(x, w).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dx.sum().backward()


def test_autocast_casts_to_autocast_dtype():
    x, w, b = _inputs("ln", (5, 33), torch.float32)
    w.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer_norm(x, w, b)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32


@pytest.mark.triton  # backend='triton' calls: on CUDA they need CUDA tensors
def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 33)
    with pytest.raises(ValueError, match="last dimension is 33"):
        rms_norm(x, torch.randn(32))
    with pytest.raises(ValueError, match="bias has shape"):
        layer_norm(x, torch.randn(33), torch.randn(34))
    with pytest.raises(TypeError, match="weight dtype torch.bfloat16 differs from x dtype torch.float32"):
        rms_norm(x, torch.randn(33, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="floating-point"):
        layer_norm(torch.ones(4, 33, dtype=torch.int64), None, None)
    with pytest.raises(ValueError, match="non-empty last dimension"):
        rms_norm(torch.randn(4, 0), None)
    with pytest.raises(ValueError, match="one statistic per row"):
        rms_norm_apply_stats(x, None, torch.ones(5))
    with pytest.raises(TypeError, match="floating point"):
        layer_norm_apply_stats(x, None, None, torch.zeros(4, dtype=torch.int32), torch.ones(4))
    with pytest.raises(TypeError, match="float64.*use backend='aten'"):
        rms_norm(x.double(), None, backend="triton")
    wide = torch.randn(2, 16385)
    with pytest.raises(ValueError, match="width 16385"):
        rms_norm(wide, None, backend="triton")
    torch.testing.assert_close(rms_norm(wide, None), F.rms_norm(wide, (16385,), eps=1e-6))  # auto: aten
    with pytest.raises(ValueError, match="unknown backend"):
        rms_norm(x, None, backend="cuda")


def test_float64_on_aten_gradcheck():
    x, w, b = _inputs("ln", (3, 7), torch.float64)
    args = [t.requires_grad_() for t in (x, w, b)]
    assert torch.autograd.gradcheck(lambda x, w, b: layer_norm(x, w, b, backend="aten"), args)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, backend="aten"), args[:2])


@pytest.mark.slow
def test_aot_specs_compile_for_sm90_without_spills():
    """Every (kernel, width) launch shape lowers to sm_90 with tools/aot_compile.py's own
    compile_kernel (TRITON_INTERPRET=0, in a subprocess) and spills no registers."""
    code = (
        "import json, sys; sys.path[:0] = [%r, %r]\n"
        "import aot_compile\n"
        "from fused_ckpt.kernels.norm import aot_specs\n"
        "for k, dt, c, ints in aot_specs():\n"
        "    for r in aot_compile.compile_kernel(k, dt, c, ints, 90, None):\n"
        "        print(json.dumps(r), flush=True)\n"
    ) % (os.path.join(ROOT, "tools"), ROOT)
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {r["kernel"] for r in rows} == {"_norm_fwd_kernel", "_norm_bwd_kernel"}
    from fused_ckpt.kernels.norm import aot_specs

    assert len(rows) == len(aot_specs())
    for r in rows:
        what = f"{r['kernel']} {r['dtype']} {r['config']} warps={r['num_warps']}"
        assert r["fits"], what
        if r.get("spill_store_bytes") is not None:
            assert r["spill_store_bytes"] == 0, f"{what} spills {r['spill_store_bytes']} B"


@pytest.mark.gpu
@pytest.mark.parametrize("width", [4096, 8192, 16384])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_matches_float64(kind, width):
    torch.manual_seed(0)
    x, w, b = _inputs(kind, (2048, width), torch.bfloat16)
    x, w = x.cuda(), w.cuda()
    b = b.cuda() if b is not None else None
    check_norm(kind, x, w, b, 1e-5, "triton", g=torch.randn(x.shape, dtype=x.dtype, device="cuda"))


def test_torch_compile_fullgraph():
    """The ops trace through their fake implementations (no graph breaks) and the compiled
    forward and backward give the eager results."""
    x, w, b = _inputs("ln", (4, 33), torch.float32)
    leaves = [t.requires_grad_() for t in (x, w, b)]

    def f(x, w, b):
        y, mean, rstd = layer_norm(x, w, b, return_stats=True)
        return rms_norm(y, w) + layer_norm_apply_stats(x, w, b, mean, rstd)

    f(*leaves).sum().backward()
    eager = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    torch.compile(f, fullgraph=True, backend="aot_eager")(*leaves).sum().backward()
    assert all(torch.equal(t.grad, e) for t, e in zip(leaves, eager))


@pytest.mark.triton
@pytest.mark.parametrize("kind,width", [("ln", 33), ("rms", 9000)])
def test_frozen_input_only_weight_grads(kind, width):
    """x without grad: only dw (and db) are computed, and match the aten backend."""
    x, w, b = _inputs(kind, (6, width), torch.float32)
    g = torch.randn(x.shape)
    grads = []
    for backend in BACKENDS:
        params = [t.detach().clone().requires_grad_() if t is not None else None for t in (w, b)]
        _fused(kind, x, params[0], params[1], 1e-5, backend).backward(g)
        grads.append([p.grad for p in params if p is not None])
    for u, v in zip(*grads):
        torch.testing.assert_close(u, v, rtol=2e-5, atol=2e-5)


def _gemma_rms(x, w, eps):
    """The Gemma family's ``(1 + w)`` RMSNorm as transformers' GemmaRMSNorm computes it (fp32
    math, ``1 + w.float()``, one rounding to x's dtype)."""
    xf = x.float() if x.dtype != torch.float64 else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (1.0 + (w.float() if w.dtype != torch.float64 else w))).type_as(x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_offset_weight_is_gemmas_one_plus_w(dtype, backend):
    """``offset=1.0`` computes ``xhat * (1 + w)`` with the gradient flowing to w (dw is that of
    the effective weight); forward and gradients match float64 by the rule, against PyTorch's
    own (Hugging Face's) computation in the same dtype; nothing besides x and rstd is kept."""
    x = (torch.randn(3, 5, 40) * 2 + 0.3).to(dtype)
    w = (0.3 * torch.randn(40)).to(dtype)  # Gemma's weights sit around 0 (initialised to zeros)
    g = torch.randn(3, 5, 40).to(dtype)
    outs = {}
    for name, fn, dt in (("got", lambda a, b: rms_norm(a, b, 1e-6, backend, offset=1.0), dtype),
                         ("ref", lambda a, b: _gemma_rms(a, b, 1e-6), torch.float64),
                         ("pt", lambda a, b: _gemma_rms(a, b, 1e-6), dtype)):
        xl, wl = x.detach().to(dt).requires_grad_(), w.detach().to(dt).requires_grad_()
        with SavedTensors() as s:
            y = fn(xl, wl)
        y.backward(g.to(dt))
        outs[name] = (y.detach(), xl.grad, wl.grad)
        if name == "got":
            assert s.total_bytes([wl]) == norm_saved_bytes(15, 40, x.element_size(), False)
    for i, n in enumerate(("y", "dx", "dw")):
        assert outs["got"][i].dtype == dtype
        assert_close_by_rule(outs["got"][i], outs["ref"][i], outs["pt"][i], n)
    if backend == "aten" and dtype == torch.float32:  # the same fp32 operations: bit-identical
        assert torch.equal(outs["got"][0], outs["pt"][0])
    # re-applied from the saved rstd: the same y
    with torch.no_grad():
        y, rstd = rms_norm(x, w, 1e-6, backend, return_stats=True, offset=1.0)
        assert torch.equal(rms_norm_apply_stats(x, w, rstd, backend, offset=1.0), y)
    with pytest.raises(ValueError, match="needs a weight"):
        rms_norm(x, None, 1e-6, backend, offset=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_offset(backend):
    ops = torch.ops.fused_ckpt
    x = torch.randn(2, 3, 33, requires_grad=True)
    w = torch.randn(33, requires_grad=True)
    dy = torch.randn(2, 3, 33)
    with torch.no_grad():
        _, rstd = ops.rms_norm_forward(x, w, 1e-6, backend, 1.0)
    for op, args in ((ops.rms_norm_forward, (x, w, 1e-6, backend, 1.0)),
                     (ops.rms_norm_apply, (x, w, rstd, backend, 1.0)),
                     (ops.rms_norm_backward, (dy, x.detach(), w.detach(), rstd, [True, True], backend, 1.0))):
        torch.library.opcheck(op, args)
