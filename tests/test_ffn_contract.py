"""The FFN's promises besides numerics: saved bytes, FLOPs, custom-op registration, conversion,
and clear errors for bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torch.utils._python_dispatch import TorchDispatchMode

from fused_ckpt import FusedCheckpointedFFN, fused_ffn
from fused_ckpt.ops import ffn as ffn_ops
from fused_ckpt.reference import EagerMLP

from .helpers import SavedTensors, assert_close_by_rule

BACKENDS = ["triton", "aten"]


# ----------------------------------------------------------------------------- saved bytes
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_saved_bytes_recompute_true_is_x(activation, dtype, backend):
    m = FusedCheckpointedFFN(32, 48, activation, recompute=True, dtype=dtype, backend=backend)
    x = torch.randn(2, 9, 32, dtype=dtype, requires_grad=True)
    with SavedTensors() as s:
        y = m(x)
    assert s.total_bytes(m.parameters()) == x.numel() * x.element_size()
    assert any(t is x for t in s.saved)  # the input itself, not a copy
    y.sum().backward()  # the graph is usable


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_saved_bytes_recompute_false_is_x_plus_preact(activation, backend):
    m = FusedCheckpointedFFN(32, 48, activation, recompute=False, backend=backend)
    x = torch.randn(18, 32, requires_grad=True)
    with SavedTensors() as s:
        m(x).sum().backward()
    fc1_rows = m.fc1.weight.shape[0]
    assert s.total_bytes(m.parameters()) == (18 * 32 + 18 * fc1_rows) * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_bytes_recompute_none_is_x_preact_hidden(backend):
    m = FusedCheckpointedFFN(32, 48, "swiglu", recompute="none", backend=backend)
    x = torch.randn(18, 32, requires_grad=True)
    with SavedTensors() as s:
        m(x).sum().backward()
    assert s.total_bytes(m.parameters()) == (18 * 32 + 18 * 96 + 18 * 48) * 4


@pytest.mark.parametrize("recompute", [True, False, "none"])
@pytest.mark.parametrize("activation", ["gelu", "geglu"])
def test_predicted_saved_bytes_and_flops_match_measured(recompute, activation):
    """The module's own predictions (used by the planner) equal what hooks and FLOP counting see."""
    m = FusedCheckpointedFFN(32, 48, activation, recompute=recompute, backend="aten",
                             dtype=torch.bfloat16)
    x = torch.randn(3, 7, 32, dtype=torch.bfloat16, requires_grad=True)
    with SavedTensors() as s:
        y = m(x)
    assert m.saved_bytes(21) == s.total_bytes(m.parameters())
    eager_like = FusedCheckpointedFFN(32, 48, activation, recompute="none", backend="aten",
                                      dtype=torch.bfloat16)
    eager_like.load_state_dict(m.state_dict())
    extra = _fwd_bwd_flops(m, x, True) - _fwd_bwd_flops(eager_like, x, True)
    assert m.recompute_flops(21) == extra
    del y


def test_saved_bytes_eager_for_comparison():
    """The accounting counts what eager autograd keeps: x, z, act(z) (and more for GELU)."""
    eager = EagerMLP(32, 48, "gelu")
    x = torch.randn(18, 32, requires_grad=True)
    with SavedTensors() as s:
        eager(x)
    assert s.total_bytes(eager.parameters()) >= (18 * 32 + 2 * 18 * 48) * 4


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_nothing_saved_without_grad(ctx):
    m = FusedCheckpointedFFN(16, 24, "gelu", recompute=False, backend="aten")
    x = torch.randn(5, 16, requires_grad=True)
    with SavedTensors() as s, ctx():
        m(x)
    assert s.saved == []


def test_params_saved_by_identity_not_copied():
    m = FusedCheckpointedFFN(16, 24, "gelu", backend="aten")
    x = torch.randn(5, 16, requires_grad=True)
    with SavedTensors() as s:
        m(x)
    params = list(m.parameters())
    kept_params = [t for t in s.saved if any(t is p for p in params)]
    assert len(kept_params) == 3  # W1, b1, W2 (b2 is not needed for backward)


# ----------------------------------------------------------------------------- FLOPs
class _SeeThroughCustomOps(TorchDispatchMode):
    """Runs fused_ckpt custom ops' Python implementations under the outer modes, so a
    FlopCounterMode entered before this one counts the GEMMs the aten backend really does."""

    IMPLS = {
        torch.ops.fused_ckpt.ffn_forward.default: ffn_ops.ffn_forward_impl,
        torch.ops.fused_ckpt.ffn_backward.default: ffn_ops.ffn_backward_impl,
    }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        impl = self.IMPLS.get(func)
        if impl is not None:
            return impl(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _fwd_bwd_flops(module, x, see_through: bool) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        if see_through:
            with _SeeThroughCustomOps():
                module(x).sum().backward()
        else:
            module(x).sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("activation,fused_units,eager_units,reentrant_units",
                         [("gelu", 7, 6, 8), ("swiglu", 11, 9, 12)])
def test_flops_equal_non_reentrant_checkpoint(activation, fused_units, eager_units, reentrant_units):
    T, d, f = 64, 32, 48
    fused = FusedCheckpointedFFN(d, f, activation, backend="aten")
    x = torch.randn(T, d, requires_grad=True)
    counted = _fwd_bwd_flops(fused, x, see_through=True)  # GEMMs the implementation runs
    formula = _fwd_bwd_flops(fused, x, see_through=False)  # the ops' registered formulas
    eager = _fwd_bwd_flops(EagerMLP(d, f, activation), x, False)
    nonre = _fwd_bwd_flops(EagerMLP(d, f, activation, checkpoint="non_reentrant"), x, False)
    reent = _fwd_bwd_flops(EagerMLP(d, f, activation, checkpoint="reentrant"), x, False)
    unit = 2 * T * d * f
    assert counted == formula == nonre == fused_units * unit
    assert eager == eager_units * unit
    assert reent == reentrant_units * unit
    assert counted * reentrant_units == reent * fused_units  # 7/8 (GELU), 11/12 (SwiGLU)


@pytest.mark.parametrize("recompute,units", [(False, 6), ("none", 6)])
def test_flops_without_gemm_recompute_equal_eager(recompute, units):
    T, d, f = 64, 32, 48
    m = FusedCheckpointedFFN(d, f, "gelu", recompute=recompute, backend="aten")
    x = torch.randn(T, d, requires_grad=True)
    counted = _fwd_bwd_flops(m, x, see_through=True)
    assert counted == _fwd_bwd_flops(m, x, see_through=False) == units * 2 * T * d * f


def test_flops_frozen_weights_skip_dw():
    T, d, f = 64, 32, 48
    m = FusedCheckpointedFFN(d, f, "gelu", backend="aten")
    m.fc1.weight.requires_grad_(False)
    m.fc2.weight.requires_grad_(False)
    x = torch.randn(T, d, requires_grad=True)
    unit = 2 * T * d * f
    counted = _fwd_bwd_flops(m, x, see_through=True)
    assert counted == _fwd_bwd_flops(m, x, see_through=False) == 5 * unit  # 2 fwd + Z, dH, dX


# ----------------------------------------------------------------------------- custom ops
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("save", [0, 1, 2])
def test_opcheck(backend, save):
    x = torch.randn(5, 16, requires_grad=True)
    w1 = torch.randn(48, 16, requires_grad=True)
    b1 = torch.randn(48, requires_grad=True)
    w2 = torch.randn(16, 24, requires_grad=True)
    b2 = torch.randn(16, requires_grad=True)
    torch.library.opcheck(torch.ops.fused_ckpt.ffn_forward.default,
                          (x, w1, b1, w2, b2, "swiglu", save, 0, backend))
    dy = torch.randn(5, 16)
    z = torch.randn(5, 48) if save >= 1 else None
    h = torch.randn(5, 24) if save == 2 else None
    torch.library.opcheck(torch.ops.fused_ckpt.ffn_backward.default,
                          (dy, x.detach(), z, h, w1.detach(), b1.detach(), w2.detach(), "swiglu",
                           [True, True, True, True, False], 0, backend))


def test_torch_compile_fullgraph_matches_eager():
    """Inductor traces the custom ops without graph breaks (fullgraph=True); compiled output and
    gradients are as close to float64 as eager fp32 is (the 2x rule; inductor reorders sums)."""
    import copy

    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(16, 16), FusedCheckpointedFFN(16, 32, "swiglu", backend="aten"),
                          nn.LayerNorm(16))
    model64 = copy.deepcopy(model).double()
    x = torch.randn(4, 7, 16, requires_grad=True)

    def run(m, inp):
        inp = inp.detach().requires_grad_()
        m.zero_grad()
        y = m(inp)
        y.square().sum().backward()
        return [y] + [p.grad for p in m.parameters()] + [inp.grad]

    eager = run(model, x)
    ref = run(model64, x.double())
    compiled = run(torch.compile(model, fullgraph=True), x)
    names = ["y"] + [n for n, _ in model.named_parameters()] + ["x"]
    for n, c, e, r in zip(names, compiled, eager, ref):
        assert_close_by_rule(c, r, e, n)


# ----------------------------------------------------------------------------- from_module
def _equivalent(src: nn.Module, dst: FusedCheckpointedFFN, d: int, tol=1e-5):
    x = torch.randn(2, 5, d)
    torch.testing.assert_close(dst(x), src(x), rtol=tol, atol=tol)


@pytest.mark.parametrize("act,name", [(nn.GELU(), "gelu"), (nn.GELU("tanh"), "gelu_tanh"),
                                      (nn.ReLU(), "relu"), (nn.SiLU(), "silu")])
def test_from_sequential(act, name):
    src = nn.Sequential(nn.Linear(16, 40), act, nn.Linear(40, 16))
    dst = FusedCheckpointedFFN.from_module(src, backend="aten")
    assert dst.activation == name and dst.d_ff == 40
    _equivalent(src, dst, 16)


def test_from_timm_style_mlp_and_state_dict():
    class Mlp(nn.Module):  # the timm layout: fc1, act, drop1, norm, fc2, drop2
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.drop1 = nn.Linear(16, 40), nn.GELU(), nn.Dropout(0.0)
            self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(40, 16), nn.Dropout(0.0)

        def forward(self, x):
            return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))

    src = Mlp()
    dst = FusedCheckpointedFFN.from_module(src, backend="aten")
    _equivalent(src, dst, 16)
    fresh = FusedCheckpointedFFN(16, 40, "gelu", backend="aten")
    fresh.load_state_dict(src.state_dict())  # timm state dicts load directly
    _equivalent(src, fresh, 16)


@pytest.mark.parametrize("family,hidden_act,expected", [
    ("llama", "silu", "swiglu"), ("mistral", "silu", "swiglu"), ("qwen2", "silu", "swiglu"),
    ("gemma", "gelu_pytorch_tanh", "geglu_tanh"),
])
def test_from_hf_gated_mlp(family, hidden_act, expected):
    transformers = pytest.importorskip("transformers")
    cfg_cls = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
               "gemma": "GemmaConfig"}[family]
    mod = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gemma": "gemma"}[family]
    cfg = getattr(transformers, cfg_cls)(hidden_size=32, intermediate_size=48, hidden_act=hidden_act,
                                         hidden_activation=hidden_act)
    mlp_cls = getattr(__import__(f"transformers.models.{mod}.modeling_{mod}", fromlist=["x"]),
                      f"{cfg_cls[:-6]}MLP")
    src = mlp_cls(cfg)
    dst = FusedCheckpointedFFN.from_module(src, backend="aten")
    assert dst.activation == expected and dst.fc1.bias is None
    _equivalent(src, dst, 32)


def test_from_phi3_packed_mlp():
    transformers = pytest.importorskip("transformers")
    from transformers.models.phi3.modeling_phi3 import Phi3MLP

    src = Phi3MLP(transformers.Phi3Config(hidden_size=32, intermediate_size=48))
    dst = FusedCheckpointedFFN.from_module(src, backend="aten")
    assert dst.activation == "swiglu"
    _equivalent(src, dst, 32)


def test_from_gpt2_mlp():
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    cfg = transformers.GPT2Config(n_embd=32, resid_pdrop=0.0)
    src = GPT2MLP(4 * 32, cfg)
    dst = FusedCheckpointedFFN.from_module(src, backend="aten")
    assert dst.activation == "gelu_tanh" and dst.d_ff == 128
    _equivalent(src, dst, 32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=str)
def test_from_module_keeps_dtype(dtype):
    src = nn.Sequential(nn.Linear(16, 40), nn.SiLU(), nn.Linear(40, 16)).to(dtype)
    dst = FusedCheckpointedFFN.from_module(src)
    assert all(p.dtype == dtype for p in dst.parameters())


def test_from_module_rejects_unknown():
    with pytest.raises(ValueError, match="cannot convert Conv2d"):
        FusedCheckpointedFFN.from_module(nn.Conv2d(3, 3, 1))
    with pytest.raises(ValueError, match="unsupported activation Tanh"):
        FusedCheckpointedFFN.from_module(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)))
    with pytest.raises(ValueError, match="Sequential must be"):
        FusedCheckpointedFFN.from_module(nn.Sequential(nn.Linear(4, 8), nn.ReLU()))


# ----------------------------------------------------------------------------- bad input
def _params(d=16, f=24, act="gelu", dtype=torch.float32):
    rows = 2 * f if act in ("swiglu", "geglu", "geglu_tanh") else f
    return (torch.randn(rows, d, dtype=dtype), torch.randn(rows, dtype=dtype),
            torch.randn(d, f, dtype=dtype), torch.randn(d, dtype=dtype))


def test_bad_last_dim():
    m = FusedCheckpointedFFN(16, 24, backend="aten")
    with pytest.raises(ValueError, match=r"last dimension of x is 15 .* d_model=16"):
        m(torch.randn(3, 15))


def test_bad_zero_dim():
    with pytest.raises(ValueError, match="0-d"):
        fused_ffn(torch.tensor(1.0), *_params())


def test_bad_dtype_mismatch():
    w1, b1, w2, b2 = _params()
    with pytest.raises(TypeError, match=r"x torch.float16.*fc1.weight torch.float32"):
        fused_ffn(torch.randn(3, 16, dtype=torch.float16), w1, b1, w2, b2)


def test_bad_integer_dtype():
    w1, b1, w2, b2 = _params()
    with pytest.raises(TypeError, match="x must be a floating-point tensor.*torch.int64"):
        fused_ffn(torch.ones(3, 16, dtype=torch.long), w1, b1, w2, b2)


def test_bad_device_mismatch():
    w1, b1, w2, b2 = _params()
    with pytest.raises(ValueError, match=r"one device.*x on meta.*fc1.weight on cpu"):
        fused_ffn(torch.randn(3, 16, device="meta"), w1, b1, w2, b2)


def test_bad_weight_shapes():
    w1, b1, w2, b2 = _params(act="swiglu")
    with pytest.raises(ValueError, match=r"fc1.weight has 48 rows, expected d_ff=24"):
        fused_ffn(torch.randn(3, 16), w1, b1, w2, b2, "gelu")
    w1, b1, w2, b2 = _params()
    with pytest.raises(ValueError, match=r"fc1.bias has shape \(23,\)"):
        fused_ffn(torch.randn(3, 16), w1, b1[:23], w2, b2)


def test_bad_activation_and_sizes():
    with pytest.raises(ValueError, match="unknown activation 'gelu_new'; supported:"):
        FusedCheckpointedFFN(16, 24, "gelu_new")
    with pytest.raises(ValueError, match="recompute must be one of"):
        FusedCheckpointedFFN(16, 24, recompute="qkv")
    with pytest.raises(ValueError, match="d_ff must be a positive int"):
        FusedCheckpointedFFN(16, 0)
    with pytest.raises(ValueError, match="chunk_tokens"):
        fused_ffn(torch.randn(3, 16), *_params(), chunk_tokens=-1)


def test_bad_input_leaves_module_usable():
    m = FusedCheckpointedFFN(16, 24, backend="aten")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError):
        m(torch.randn(3, 17))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k])
    assert m(torch.randn(3, 16)).shape == (3, 16)


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    from fused_ckpt.backend import resolve_backend

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        resolve_backend("triton", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "aten"


def test_default_chunk_tokens():
    # bf16, d=4096, GELU f=16384: 256 MiB of temporaries would be 4096 tokens, but fp32 dW
    # accumulators (2 x 256 MiB) only pay off above 8192 tokens per chunk.
    assert ffn_ops.default_chunk_tokens(4096, 16384, 16384, 2) == 8192
    assert ffn_ops.default_chunk_tokens(64, 64, 64, 4) % ffn_ops.CHUNK_ROUND == 0
