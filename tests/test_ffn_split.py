"""The fused FFN over weights where they live (issue 11 item 1): separate gate and up weights as
two tensors, a packed gate_up weight as two views, Conv1D weights read transposed through
strides, non-contiguous weights; ``FusedCheckpointedFFN.from_module(share_parameters=True)``
keeps the source module's parameters, names and layout."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fused_ckpt import FusedCheckpointedFFN, fused_ffn
from fused_ckpt.modules.ffn import FusedSharedFFN
from fused_ckpt.ops.ffn import ffn_saved_bytes

from .helpers import assert_close_by_rule

D, F = 16, 24


class GatedMLP(nn.Module):  # Llama's layout
    def __init__(self, bias, strided=False):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(D, F, bias=bias), nn.Linear(D, F, bias=bias)
        self.down_proj, self.act_fn = nn.Linear(F, D, bias=bias), nn.SiLU()
        if strided:  # gate stored transposed, up a strided slice: neither is contiguous
            with torch.no_grad():
                self.gate_proj.weight = nn.Parameter(self.gate_proj.weight.t().contiguous().t())
                big = torch.randn(F, 2 * D) * D ** -0.5
                self.up_proj.weight = nn.Parameter(big[:, ::2])
            assert not self.gate_proj.weight.is_contiguous() and not self.up_proj.weight.is_contiguous()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PackedMLP(nn.Module):  # Phi-3's layout
    def __init__(self, bias):
        super().__init__()
        self.gate_up_proj, self.down_proj = nn.Linear(D, 2 * F, bias=bias), nn.Linear(F, D, bias=bias)
        self.activation_fn = nn.SiLU()

    def forward(self, x):
        g, u = self.gate_up_proj(x).chunk(2, -1)
        return self.down_proj(self.activation_fn(g) * u)


def _conv1d_mlp():  # GPT-2's layout: Conv1D weights are [in, out]
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    class Conv1DMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.c_proj = Conv1D(F, D), Conv1D(D, F)
            self.act = nn.GELU(approximate="tanh")

        def forward(self, x):
            return self.c_proj(self.act(self.c_fc(x)))

    m = Conv1DMLP()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def _make(kind, bias=True):
    torch.manual_seed(0)
    if kind == "gated":
        return GatedMLP(bias)
    if kind == "gated_strided":
        return GatedMLP(bias, strided=True)
    if kind == "packed":
        return PackedMLP(bias)
    if kind == "conv1d":
        return _conv1d_mlp()
    if kind == "sequential":
        return nn.Sequential(nn.Linear(D, F, bias=bias), nn.GELU(), nn.Linear(F, D, bias=bias))
    raise KeyError(kind)


def _run(m, x, g):
    x = x.detach().requires_grad_()
    y = m(x)
    y.backward(g)
    return y.detach(), x.grad, {n: p.grad for n, p in m.named_parameters()}


def _check(mlp, dtype, backend, recompute, chunk_tokens=0, tokens=(2, 5)):
    """The shared fused FFN over ``mlp``'s own parameters against ``mlp``'s eager forward in
    float64 by the 2x rule, every gradient (read from ``mlp``'s own parameters)."""
    mlp = mlp.to(dtype)
    ref64 = copy.deepcopy(mlp).double()
    pt = copy.deepcopy(mlp)
    fused = FusedCheckpointedFFN.from_module(mlp, recompute=recompute, share_parameters=True, backend=backend,
                                             chunk_tokens=chunk_tokens)
    assert [id(p) for p in fused.parameters()] == [id(p) for p in mlp.parameters()]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*tokens, D, generator=gen).to(dtype)
    g = torch.randn(*tokens, D, generator=gen).to(dtype)
    y, dx, dp = _run(fused, x, g)
    y64, dx64, dp64 = _run(ref64, x.double(), g.double())
    ypt, dxpt, dppt = _run(pt, x, g)
    assert_close_by_rule(y, y64, ypt, "y")
    assert_close_by_rule(dx, dx64, dxpt, "dx")
    assert set(dp) == set(dp64)
    for n, p in mlp.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, n
        assert_close_by_rule(dp[n], dp64[n], dppt[n], f"d{n}")


@pytest.mark.parametrize("backend", ["triton", "aten"])
@pytest.mark.parametrize("recompute", [True, False, "none"], ids=["recompute", "save_preact", "save_all"])
@pytest.mark.parametrize("kind", ["gated", "gated_strided", "packed", "conv1d"])
def test_weights_where_they_live_match_float64(kind, recompute, backend):
    _check(_make(kind), torch.float32, backend, recompute)


@pytest.mark.parametrize("backend", ["triton", "aten"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["gated", "conv1d"])
def test_separate_and_transposed_weights_half_precision(kind, dtype, backend):
    """dX = dG Wg + dU Wu is summed in fp32 and rounded once for separate 16-bit weights."""
    _check(_make(kind), dtype, backend, True)


@pytest.mark.parametrize("backend", ["triton", "aten"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_separate_weights_chunked_backward(dtype, backend):
    """Several backward chunks, the last one partial: dWg, dWu, db in fp32 accumulators."""
    _check(_make("gated"), dtype, backend, True, chunk_tokens=4, tokens=(3, 5))


@pytest.mark.parametrize("backend", ["triton", "aten"])
def test_separate_weights_no_bias_and_frozen_up(backend):
    mlp = _make("gated", bias=False)
    mlp.up_proj.weight.requires_grad_(False)
    fused = FusedCheckpointedFFN.from_module(mlp, share_parameters=True, backend=backend)
    x = torch.randn(7, D, requires_grad=True)
    fused(x).sum().backward()
    assert mlp.up_proj.weight.grad is None
    assert mlp.gate_proj.weight.grad is not None and mlp.down_proj.weight.grad is not None
    ref = copy.deepcopy(mlp).double()
    xr = x.detach().double().requires_grad_()
    ref(xr).sum().backward()
    torch.testing.assert_close(mlp.gate_proj.weight.grad.double(), ref.gate_proj.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["gated", "packed", "conv1d", "sequential"])
def test_share_parameters_keeps_identity_and_trains_every_parameter(kind):
    """Same Parameter objects, state-dict keys, layout and module names as the source; an
    optimizer built on the source before conversion trains every parameter."""
    mlp = _make(kind)
    keys = {k: (tuple(v.shape), v.stride(), v.data_ptr()) for k, v in mlp.state_dict().items()}
    names = [n for n, _ in mlp.named_modules()]
    before = {n: p.detach().clone() for n, p in mlp.named_parameters()}
    opt = torch.optim.AdamW(mlp.parameters(), lr=1e-2)
    fused = FusedCheckpointedFFN.from_module(mlp, share_parameters=True, backend="aten")
    assert isinstance(fused, FusedSharedFFN)
    assert [id(p) for p in fused.parameters()] == [id(p) for p in mlp.parameters()]
    assert {k: (tuple(v.shape), v.stride(), v.data_ptr()) for k, v in fused.state_dict().items()} == keys
    assert [n for n, _ in fused.named_modules()] == names
    fused(torch.randn(5, D)).pow(2).sum().backward()
    opt.step()
    unchanged = [n for n, p in mlp.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, unchanged
    # the converted module's state dict loads into the source's class as is
    copy.deepcopy(mlp).load_state_dict(fused.state_dict())


def test_share_parameters_refuses_multihead_attention():
    from fused_ckpt import FusedCheckpointedAttention

    with pytest.raises(ValueError, match="in_proj_weight"):
        FusedCheckpointedAttention.from_module(nn.MultiheadAttention(32, 2, batch_first=True), share_parameters=True)


def test_split_weights_keep_the_saved_tensor_contract_and_flops():
    """x alone is saved with recompute=True (weights are the parameters themselves); the FLOPs
    counted for separate gate/up weights equal those of the packed weight."""
    torch.manual_seed(0)
    T = 6
    wg, wu = torch.randn(F, D, requires_grad=True), torch.randn(F, D, requires_grad=True)
    w2 = torch.randn(D, F, requires_grad=True)
    params = {id(t) for t in (wg, wu, w2)}
    for save, recompute in ((0, True), (1, False), (2, "none")):
        x = torch.randn(T, D, requires_grad=True)
        kept = []

        def pack(t):
            if id(t) not in params and t is not x:
                kept.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = fused_ffn(x, wg, None, w2, None, "swiglu", recompute, backend="aten", w_up=wu)
        expected = ffn_saved_bytes(T, D, F, True, save, 4) - T * D * 4  # x is the input itself
        assert sum(kept) == expected, (recompute, kept)
        y.sum().backward()

    def flops(**kw):
        x = torch.randn(T, D, requires_grad=True)
        with FlopCounterMode(display=False) as fc:
            fused_ffn(x, backend="aten", activation="swiglu", **kw).sum().backward()
        return fc.get_total_flops()

    packed = torch.cat([wg, wu]).detach().requires_grad_()
    assert flops(w1=wg, b1=None, w2=w2, b2=None, w_up=wu) == flops(w1=packed, b1=None, w2=w2, b2=None) > 0


def test_split_weight_errors_name_the_problem():
    wg, w2 = torch.randn(F, D), torch.randn(D, F)
    x = torch.randn(3, D)
    with pytest.raises(ValueError, match="same shape"):
        fused_ffn(x, wg, None, w2, None, "swiglu", w_up=torch.randn(F - 1, D))
    with pytest.raises(ValueError, match="gated activation"):
        fused_ffn(x, wg, None, w2, None, "gelu", w_up=torch.randn(F, D))
    with pytest.raises(ValueError, match="both have a bias"):
        fused_ffn(x, wg, torch.randn(F), w2, None, "swiglu", w_up=torch.randn(F, D))
