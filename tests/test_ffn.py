"""FusedCheckpointedFFN / fused_ffn: numerics against float64, both backends, all activations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_ckpt
from fused_ckpt import FusedCheckpointedFFN, fused_ffn
from fused_ckpt.activations import ACTIVATIONS, get_activation
from fused_ckpt.reference import ffn_reference

from .conftest import DEVICE, HAS_CUDA
from .helpers import assert_close_by_rule

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BACKENDS = ["triton", "aten"]
PARAM_NAMES = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def _make(d_model, d_ff, activation, bias, dtype, device=None, recompute=True, backend="triton", **kw):
    m = FusedCheckpointedFFN(d_model, d_ff, activation, bias=bias, recompute=recompute,
                             device=device, dtype=dtype, backend=backend, **kw)
    with torch.no_grad():  # bias init of nn.Linear is small; make biases matter in the check
        for p in m.parameters():
            p.mul_(1.5)
    return m


def _run_reference(m: FusedCheckpointedFFN, x: torch.Tensor, g: torch.Tensor, dtype: torch.dtype):
    """Eager forward/backward of the same math with the module's parameters cast to ``dtype``."""
    params = {n: p.detach().to(dtype).requires_grad_() for n, p in m.named_parameters()}
    xr = x.detach().to(dtype).requires_grad_()
    y = ffn_reference(xr, params["fc1.weight"], params.get("fc1.bias"), params["fc2.weight"],
                      params.get("fc2.bias"), m.activation)
    y.backward(g.to(dtype))
    return y.detach(), xr.grad, {n: p.grad for n, p in params.items()}


def check_ffn(m: FusedCheckpointedFFN, x: torch.Tensor, g: torch.Tensor | None = None, factor=2.0):
    """Forward + backward of ``m`` against float64 by the 2x-PyTorch-error rule, every gradient."""
    x = x.detach().requires_grad_()
    y = m(x)
    if g is None:
        g = torch.randn_like(y)
    y.backward(g)
    y64, dx64, dp64 = _run_reference(m, x, g, torch.float64)
    ypt, dxpt, dppt = _run_reference(m, x, g, x.dtype)
    assert_close_by_rule(y, y64, ypt, "y", factor)
    assert_close_by_rule(x.grad, dx64, dxpt, "dx", factor)
    for n, p in m.named_parameters():
        assert_close_by_rule(p.grad, dp64[n], dppt[n], f"d{n}", factor)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("recompute", [True, False, "none"], ids=["recompute", "save_preact", "save_all"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_matches_float64(activation, bias, recompute, dtype, backend):
    # odd sizes: 39 tokens (2 row tiles + tail), d_model 40 (2 K steps + tail), d_ff 45
    m = _make(40, 45, activation, bias, dtype, recompute=recompute, backend=backend)
    x = torch.randn(3, 13, 40, dtype=dtype)
    check_ffn(m, x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(1, 24), (7, 1, 24), (2, 3, 5, 24), (24,)], ids=str)
def test_shapes(shape, backend):
    m = _make(24, 33, "swiglu", True, torch.float32, backend=backend)
    check_ffn(m, torch.randn(shape))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "geglu"])
def test_non_contiguous_input_and_grad(activation, backend):
    m = _make(24, 40, activation, True, torch.float32, backend=backend)
    x = torch.randn(24, 19, 2)[..., 0].t()  # (19, 24), strides (2, 38)
    assert not x.is_contiguous()
    g = torch.randn(24, 19).t()  # non-contiguous upstream gradient
    check_ffn(m, x, g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recompute", [True, False, "none"])
def test_zero_tokens(backend, recompute):
    m = _make(16, 24, "swiglu", True, torch.float32, recompute=recompute, backend=backend)
    x = torch.randn(0, 5, 16, requires_grad=True)
    y = m(x)
    assert y.shape == (0, 5, 16)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_chunked_backward_matches(activation, dtype, backend):
    """chunk_tokens=16 over 50 tokens: 4 chunks, fp32 dW accumulation, same tolerance rule."""
    m = _make(32, 40, activation, True, dtype, backend=backend, chunk_tokens=16)
    x = torch.randn(50, 32, dtype=dtype)
    check_ffn(m, x)
    # and it equals the unchunked result closely (same math, different dW summation order)
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.chunk_tokens = 0
    m(x).backward(torch.ones(50, 32, dtype=dtype))
    m2 = _make(32, 40, activation, True, dtype, backend=backend, chunk_tokens=16)
    m2.load_state_dict(m.state_dict())
    m2(x).backward(torch.ones(50, 32, dtype=dtype))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for (n, p), (_, p2) in zip(m.named_parameters(), m2.named_parameters()):
        torch.testing.assert_close(p2.grad.float(), p.grad.float(), rtol=tol, atol=tol)
    assert grads  # the rule-checked gradients above were produced


@pytest.mark.parametrize("backend", ["aten"])
def test_chunked_bf16_weight_grads_are_rounded_once(backend):
    """Each chunk's dW partial goes into the fp32 accumulator unrounded, so 16 chunks give the
    unchunked bf16 dW (one rounding of an fp32 sum; only the summation order differs). aten
    only: the Triton GEMM accumulates in fp32 in the kernel, but under the interpreter its final
    fp32 -> bf16 store truncates instead of rounding to nearest (triton 3.6 and 3.9), so its
    unchunked bf16 output is not the correctly rounded one there."""
    T = 256
    grads = {}
    for chunk in (0, 16):
        torch.manual_seed(0)
        m = _make(32, 40, "gelu", True, torch.bfloat16, backend=backend, chunk_tokens=chunk)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(T, 32, generator=gen).bfloat16()
        m(x).backward(torch.randn(T, 32, generator=gen).bfloat16())
        grads[chunk] = (m.fc1.weight.grad, m.fc2.weight.grad)
    for a, b in zip(grads[0], grads[16]):
        differ = (a != b).float().mean().item()
        assert differ < 0.02, differ  # rounding each of 16 partials to bf16 made ~40% differ
        torch.testing.assert_close(b.float(), a.float(), rtol=2 ** -7, atol=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weights_skip_grads(backend):
    m = _make(24, 40, "gelu", True, torch.float32, backend=backend)
    m.fc1.weight.requires_grad_(False)
    m.fc2.weight.requires_grad_(False)
    x = torch.randn(9, 24, requires_grad=True)
    g = torch.randn(9, 24)
    m(x).backward(g)
    assert m.fc1.weight.grad is None and m.fc2.weight.grad is None
    _, dx64, dp64 = _run_reference(m, x, g, torch.float64)
    torch.testing.assert_close(x.grad.double(), dx64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.fc1.bias.grad.double(), dp64["fc1.bias"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.fc2.bias.grad.double(), dp64["fc2.bias"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_fc2_trainable(backend):
    """x without grad and fc1 frozen: no dZ at all, only H for dW2."""
    m = _make(24, 40, "swiglu", True, torch.float32, backend=backend)
    m.fc1.requires_grad_(False)
    x = torch.randn(9, 24)
    g = torch.randn(9, 24)
    m(x).backward(g)
    _, _, dp64 = _run_reference(m, x, g, torch.float64)
    torch.testing.assert_close(m.fc2.weight.grad.double(), dp64["fc2.weight"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.fc2.bias.grad.double(), dp64["fc2.bias"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    m = _make(16, 24, "gelu", True, torch.float32, backend=backend)
    x = torch.randn(4, 16)
    x[1, 3] = float("nan")
    y = m(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2, 3]]).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_computes_in_autocast_dtype(dtype):
    m = _make(24, 40, "gelu", True, torch.float32, backend="aten")
    lin = torch.nn.Linear(24, 24)
    x = torch.randn(6, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=dtype):
        y = m(x)
        y_lin = lin(x)
    assert y.dtype == y_lin.dtype == dtype
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    assert m.fc1.weight.grad.dtype == torch.float32
    ref = ffn_reference(x.to(dtype), *(p.to(dtype) for p in (m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias)))
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_double_backward_raises():
    m = _make(16, 24, "gelu", True, torch.float32, backend="aten")
    x = torch.randn(3, 16, requires_grad=True)
    (gx,) = torch.autograd.grad(m(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_module_api_and_state_dict_round_trip():
    m = FusedCheckpointedFFN(24, 40, "swiglu", backend="aten")
    sd = m.state_dict()
    assert set(sd) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert sd["fc1.weight"].shape == (80, 24) and sd["fc2.weight"].shape == (24, 40)
    m2 = FusedCheckpointedFFN(24, 40, "swiglu", backend="aten")
    m2.load_state_dict(sd)
    x = torch.randn(5, 24)
    assert torch.equal(m(x), m2(x))
    assert "swiglu" in repr(m)


def test_functional_equals_module():
    m = _make(24, 40, "geglu_tanh", False, torch.float32, backend="aten")
    x = torch.randn(7, 24)
    y = fused_ffn(x, m.fc1.weight, None, m.fc2.weight, None, "geglu_tanh", backend="aten")
    torch.testing.assert_close(y, m(x), rtol=0, atol=0)
    assert fused_ckpt.fused_ffn is fused_ffn


def test_inference_mode_and_no_grad_work():
    m = _make(16, 24, "silu", True, torch.float32, backend="aten")
    x = torch.randn(3, 16)
    with torch.inference_mode():
        y1 = m(x)
    with torch.no_grad():
        y2 = m(x)
    torch.testing.assert_close(y1, y2)
    assert not y2.requires_grad


@pytest.mark.triton
def test_backend_env_override(monkeypatch):
    from fused_ckpt.backend import resolve_backend

    monkeypatch.setenv("FUSED_CKPT_BACKEND", "aten")
    assert resolve_backend("auto", torch.device("cpu")) == "aten"
    assert resolve_backend("triton", torch.device(DEVICE)) == "triton"  # explicit wins (CUDA or interpreter)
    monkeypatch.setenv("FUSED_CKPT_BACKEND", "bogus")
    with pytest.raises(ValueError, match="FUSED_CKPT_BACKEND"):
        resolve_backend("auto", torch.device("cpu"))
    monkeypatch.delenv("FUSED_CKPT_BACKEND")
    with pytest.raises(ValueError, match="unknown backend"):
        resolve_backend("cublas", torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["gelu", "swiglu", "geglu_tanh", "relu"])
@pytest.mark.parametrize("recompute", [True, False])
def test_cuda_compiled_triton(activation, dtype, recompute):
    m = _make(256, 704, activation, True, dtype, device="cuda", recompute=recompute)
    check_ffn(m, torch.randn(3, 333, 256, device="cuda", dtype=dtype))


@pytest.mark.gpu
def test_cuda_peak_memory_four_layers():
    """4-layer stack fwd+bwd: the fused stack's peak sits below the eager stack's by about
    the pre-activations and activations it does not keep."""
    from fused_ckpt.reference import EagerMLP

    d, f, T = 1024, 4096, 4096

    def peak(make):
        torch.cuda.empty_cache()
        layers = torch.nn.Sequential(*[make() for _ in range(4)]).cuda().bfloat16()
        x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        # warm-up: the first call compiles and autotunes (benchmark buffers would set the peak)
        layers(x).sum().backward()
        x.grad = None
        layers.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        layers(x).sum().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    fused = peak(lambda: FusedCheckpointedFFN(d, f, "gelu"))
    eager = peak(lambda: EagerMLP(d, f, "gelu"))
    saved_eager_per_layer = 2 * T * f * 2  # z and h in bf16
    assert eager - fused >= 3 * saved_eager_per_layer * 0.9, (eager, fused)


def test_activation_registry():
    with pytest.raises(ValueError, match="supported: .*geglu.*swiglu"):
        get_activation("mish")
    for name, a in ACTIVATIONS.items():
        z = torch.randn(64, 8, dtype=torch.float64, requires_grad=True)
        (g,) = torch.autograd.grad(a.base_fn(z).sum(), z)
        torch.testing.assert_close(a.base_grad(z.detach()), g)
    assert F.silu is not None
