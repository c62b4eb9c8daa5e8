"""FusedCheckpointedAttention: against Hugging Face LlamaAttention (output and every gradient),
the saved-tensor contract of each recompute mode, conversions, determinism and input errors."""
from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

from fused_ckpt.modules.attention import FusedCheckpointedAttention
from fused_ckpt.ops.attention import attn_block_backward, attn_block_forward

from .conftest import DEVICE
from .helpers import SavedTensors, assert_close_by_rule, deterministic

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding  # noqa: E402

DEV = DEVICE
needs_triton = pytest.mark.triton  # conftest: on CUDA tensors with a GPU, skipped without GPU or interpreter
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def llama_config(hidden=64, heads=2, kv_heads=1, head_dim=32, bias=False, theta=10000.0, **kw):
    """A tiny random Llama config (nothing downloaded), transformers 4.x or 5.x."""
    cfg = LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      head_dim=head_dim, attention_bias=bias, max_position_embeddings=1024,
                      rope_theta=theta, **kw)
    return cfg


def hf_attention(cfg, dtype, impl, device=DEV):
    cfg = copy.deepcopy(cfg)
    cfg._attn_implementation = impl
    torch.manual_seed(1)
    attn = LlamaAttention(cfg, layer_idx=0)
    with torch.no_grad():  # make the biases matter (drawn in fp32: the same values for every dtype)
        for n in PROJ:
            if getattr(attn, n).bias is not None:
                getattr(attn, n).bias.normal_(0, 0.5)
    return attn.to(device=device, dtype=dtype)


def hf_forward(attn, x, position_ids=None, key_padding_mask=None, causal=True):
    """LlamaAttention's current forward: position_embeddings come from LlamaRotaryEmbedding."""
    B, S, _ = x.shape
    if position_ids is None:
        position_ids = torch.arange(S, device=x.device)[None].expand(B, S)
    rot = LlamaRotaryEmbedding(attn.config).to(x.device)
    cos, sin = rot(x, position_ids)
    keep = torch.ones(S, S, dtype=torch.bool, device=x.device)
    if causal:
        keep = keep.tril()
    keep = keep[None, None]
    if key_padding_mask is not None:
        keep = keep & key_padding_mask[:, None, None, :]
    if attn.config._attn_implementation == "eager":  # additive mask, as HF builds it
        mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill(~keep, torch.finfo(x.dtype).min)
    else:
        mask = keep.expand(B, 1, S, S)
    return attn(x, position_embeddings=(cos, sin), attention_mask=mask)[0]


def run_and_grads(fn, module, x, g):
    x = x.detach().clone().requires_grad_()
    y = fn(module, x)
    y.backward(g.to(y.dtype))
    grads = {"dx": x.grad}
    for n in PROJ:
        lin = getattr(module, n)
        grads[f"{n}.weight"] = lin.weight.grad
        if lin.bias is not None:
            grads[f"{n}.bias"] = lin.bias.grad
    return y.detach(), grads


def compare_with_llama(cfg, dtype, B, S, recompute="qkv", backend="auto", position_ids=None, kpm=None):
    """Ours (dtype) vs HF LlamaAttention in float64 (SDPA math: exact fp64) with the HF eager
    module in ``dtype`` as PyTorch's same-dtype error, for the output and every gradient."""
    hf64 = hf_attention(cfg, torch.float64, "sdpa")
    hf_pt = hf_attention(cfg, dtype, "eager")
    ours = FusedCheckpointedAttention.from_module(hf_pt, recompute=recompute, backend=backend)
    assert set(ours.state_dict()) == set(hf_pt.state_dict())
    x = torch.randn(B, S, cfg.hidden_size, device=DEV, dtype=dtype)
    g = torch.randn(B, S, cfg.hidden_size, device=DEV, dtype=dtype)
    hf_fn = lambda m, x: hf_forward(m, x, position_ids, kpm)  # noqa: E731
    y64, g64 = run_and_grads(hf_fn, hf64, x.double(), g.double())
    ypt, gpt = run_and_grads(hf_fn, hf_pt, x, g)
    y, gr = run_and_grads(lambda m, x: m(x, position_ids=position_ids, key_padding_mask=kpm), ours, x, g)
    assert y.dtype == dtype
    assert_close_by_rule(y, y64, ypt, "y")
    assert set(gr) == set(g64)
    for n in g64:
        assert gr[n].dtype == dtype, n
        assert_close_by_rule(gr[n], g64[n], gpt[n], n)
    return ours


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_matches_llama_gqa(dtype):
    # 4 query heads over 2 kv heads, head_dim 32 != hidden / heads (HF allows it)
    compare_with_llama(llama_config(hidden=64, heads=4, kv_heads=2, head_dim=32), dtype, B=2, S=33)


@needs_triton
def test_matches_llama_bias_positions_padding():
    cfg = llama_config(hidden=64, heads=2, kv_heads=2, head_dim=32, bias=True, theta=500000.0)
    B, S = 2, 17
    position_ids = torch.stack([torch.arange(S), torch.arange(S) + 100]).to(DEV)  # e.g. a later chunk
    kpm = torch.ones(B, S, dtype=torch.bool, device=DEV)
    kpm[1, 12:] = False  # right padding: every query still sees key 0
    compare_with_llama(cfg, torch.bfloat16, B, S, position_ids=position_ids, kpm=kpm)


@needs_triton
def test_matches_llama_long_mqa_head_dim_64():
    compare_with_llama(llama_config(hidden=128, heads=2, kv_heads=1, head_dim=64), torch.bfloat16, B=1, S=130,
                       recompute="all")


@pytest.mark.parametrize("recompute", ["qkv", "all", False])
def test_aten_backend_matches_llama(recompute):
    compare_with_llama(llama_config(hidden=64, heads=4, kv_heads=2, head_dim=32, bias=True), torch.bfloat16,
                       B=2, S=19, recompute=recompute, backend="aten")


# --------------------------------------------------------------------------- recompute contract
def _block(recompute, dtype=torch.float32, backend="auto", bias=True, rope=10000.0, H=4, H_kv=2):
    torch.manual_seed(2)
    return FusedCheckpointedAttention(64, H, H_kv, causal=True, bias=bias, rope_theta=rope, recompute=recompute,
                                      device=DEV, dtype=dtype, head_dim=32, backend=backend)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "aten"])
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "positions+mask"])
@pytest.mark.parametrize("recompute", ["qkv", "all", False])
def test_saved_bytes_are_exactly_the_contract(recompute, extras, backend):
    B, S, d, H, H_kv, D = 2, 9, 64, 4, 2, 32
    m = _block(recompute, torch.bfloat16, backend)
    x = torch.randn(B, S, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(S, device=DEV)[None].expand(B, S).contiguous() if extras else None
    kpm = torch.ones(B, S, dtype=torch.bool, device=DEV) if extras else None
    with SavedTensors() as st:
        y = m(x, position_ids=pos, key_padding_mask=kpm)
    e = x.element_size()
    x_b, o_b, lse_b = B * S * d * e, B * S * H * D * e, B * H * S * 4
    q_b, kv_b = B * S * H * D * e, 2 * B * S * H_kv * D * e
    expected = {"all": x_b + lse_b, "qkv": x_b + o_b + lse_b, False: x_b + q_b + kv_b + o_b + lse_b}[recompute]
    if extras:
        expected += B * S * 8 + B * S * 1  # int64 position_ids, bool mask
    assert st.total_bytes(m.parameters()) == expected
    y.float().sum().backward()  # and the saved tensors are enough for backward
    assert x.grad is not None and all(p.grad is not None for p in m.parameters())
    with torch.no_grad(), SavedTensors() as st:
        m(x)
    assert st.saved == []


@needs_triton
def test_recompute_modes_agree_bitwise():
    """The recomputed q, k, v and attention output are bitwise the forward's, so every mode gives
    the same output and gradients."""
    x = torch.randn(2, 21, 64, device=DEV)
    g = torch.randn(2, 21, 64, device=DEV)
    with deterministic():  # bitwise comparison: no dQ atomics
        results = [run_and_grads(lambda m, x: m(x), _block(r), x, g) for r in ("qkv", "all", False)]
    for y, grads in results[1:]:
        assert torch.equal(y, results[0][0])
        for n in grads:
            assert torch.equal(grads[n], results[0][1][n]), n


@needs_triton
def test_deterministic_backward():
    m = _block("all", torch.bfloat16)
    x = torch.randn(2, 40, 64, device=DEV, dtype=torch.bfloat16)
    g = torch.randn_like(x)
    with deterministic():
        a = run_and_grads(lambda m, x: m(x), m, x, g)[1]
        a = {n: t.clone() for n, t in a.items()}
        m.zero_grad()
        b = run_and_grads(lambda m, x: m(x), m, x, g)[1]
    for n in a:
        assert torch.equal(a[n], b[n]), n


@needs_triton
def test_frozen_weights_and_no_rope():
    m = _block("qkv", rope=None, bias=False)
    for n in ("q_proj", "k_proj", "v_proj"):
        getattr(m, n).weight.requires_grad_(False)
    x = torch.randn(1, 11, 64, device=DEV, requires_grad=True)
    m(x).sum().backward()
    assert m.q_proj.weight.grad is None and m.o_proj.weight.grad is not None and x.grad is not None


def test_autocast_runs_in_autocast_dtype():
    m = _block("qkv", backend="aten")
    x = torch.randn(1, 7, 64, device=DEV)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert m.q_proj.weight.grad.dtype == torch.float32


# --------------------------------------------------------------------------- conversions
def test_from_module_rope_configs():
    attn = hf_attention(llama_config(theta=500000.0), torch.float32, "eager")
    assert FusedCheckpointedAttention.from_module(attn).rope_theta == 500000.0
    scaled = hf_attention(llama_config(rope_scaling={"rope_type": "linear", "factor": 2.0}), torch.float32, "eager")
    with pytest.raises(ValueError, match="rope type 'linear'"):
        FusedCheckpointedAttention.from_module(scaled)

    # transformers 4.x layout: rope_theta and rope_scaling on the config, no rope_parameters
    class Legacy(nn.Module):
        def __init__(self, scaling):
            super().__init__()
            self.config = types.SimpleNamespace(num_attention_heads=2, num_key_value_heads=1, hidden_size=64,
                                                head_dim=32, rope_theta=1e6, rope_scaling=scaling,
                                                attention_dropout=0.0)
            self.q_proj, self.o_proj = nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False)
            self.k_proj, self.v_proj = nn.Linear(64, 32, bias=False), nn.Linear(64, 32, bias=False)

    m = FusedCheckpointedAttention.from_module(Legacy(None))
    assert (m.rope_theta, m.n_heads, m.n_kv_heads, m.head_dim, m.causal) == (1e6, 2, 1, 32, True)
    with pytest.raises(ValueError, match="dynamic"):
        FusedCheckpointedAttention.from_module(Legacy({"type": "dynamic", "factor": 2.0}))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "aten"])
def test_from_multihead_attention(causal, backend):
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(64, 2, batch_first=True, device=DEV)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
    ours = FusedCheckpointedAttention.from_module(mha, causal=causal, backend=backend)
    assert ours.rope_theta is None and ours.causal == causal
    x = torch.randn(2, 13, 64, device=DEV)
    kpm = torch.ones(2, 13, dtype=torch.bool, device=DEV)
    kpm[1, 9:] = False
    attn_mask = torch.ones(13, 13, dtype=torch.bool, device=DEV).triu(1) if causal else None
    ref = mha(x, x, x, key_padding_mask=~kpm, attn_mask=attn_mask, need_weights=False)[0]
    torch.testing.assert_close(ours(x, key_padding_mask=kpm), ref, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="batch_first"):
        FusedCheckpointedAttention.from_module(nn.MultiheadAttention(64, 2))
    with pytest.raises(ValueError, match="kdim"):
        FusedCheckpointedAttention.from_module(nn.MultiheadAttention(64, 2, kdim=32, vdim=32, batch_first=True))


def test_from_module_rejects_unknown():
    with pytest.raises(ValueError, match="cannot convert Linear"):
        FusedCheckpointedAttention.from_module(nn.Linear(4, 4))


# --------------------------------------------------------------------------- errors, ops
def test_bad_inputs():
    with pytest.raises(ValueError, match="head_dim"):
        FusedCheckpointedAttention(48, 1)
    with pytest.raises(ValueError, match="must divide"):
        FusedCheckpointedAttention(128, 4, 3)
    with pytest.raises(ValueError, match="recompute"):
        FusedCheckpointedAttention(64, 2, recompute="some")
    m = FusedCheckpointedAttention(64, 2, rope_theta=10000.0, backend="aten")
    x = torch.randn(2, 5, 64)
    with pytest.raises(ValueError, match="expected \\(64, 32\\)"):
        m(torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="batch, seqlen, d_model"):
        m(torch.randn(5, 64))
    with pytest.raises(TypeError, match="share one dtype"):
        m(x.double())
    with pytest.raises(ValueError, match="one device"):
        m(x.to("meta"))
    with pytest.raises(ValueError, match="position_ids has shape"):
        m(x, position_ids=torch.arange(4))
    with pytest.raises(TypeError, match="integer"):
        m(x, position_ids=torch.arange(5.0))
    with pytest.raises(ValueError, match="key_padding_mask has shape"):
        m(x, key_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="rope_theta=None"):
        FusedCheckpointedAttention(64, 2, backend="aten")(x, position_ids=torch.arange(5))


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=needs_triton), "aten"])
def test_opcheck_block_ops(backend):
    m = _block("qkv", backend=backend)
    B, S = 1, 9
    x = torch.randn(B, S, 64, device=DEV, requires_grad=True)
    ws = [m.q_proj.weight, m.q_proj.bias, m.k_proj.weight, m.k_proj.bias, m.v_proj.weight, m.v_proj.bias,
          m.o_proj.weight, m.o_proj.bias]
    kpm = torch.ones(B, S, dtype=torch.bool, device=DEV)
    args = (x, *ws, None, kpm, 4, 2, True, 0.2, 10000.0)
    for mode in ("qkv", "all", "none"):
        torch.library.opcheck(attn_block_forward, args + (mode, backend))
    y, o, lse, *_ = attn_block_forward(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                                       "qkv", backend)
    dets = [w.detach() for w in ws]
    torch.library.opcheck(attn_block_backward, (torch.randn_like(y), x.detach(), *dets[:7], None, None, None, o,
                                                lse, None, kpm, 4, 2, True, 0.2, 10000.0, [True] * 9, backend))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("recompute", ["qkv", "all"])
def test_compiled_module_gpu(dtype, recompute):
    cfg = llama_config(hidden=256, heads=4, kv_heads=2, head_dim=64)
    compare_with_llama(cfg, dtype, B=2, S=300, recompute=recompute)
    m = FusedCheckpointedAttention.from_module(hf_attention(cfg, dtype, "eager"), recompute=recompute)
    mc = copy.deepcopy(m)
    compiled = torch.compile(mc, fullgraph=True)
    x = torch.randn(2, 300, 256, device="cuda", dtype=dtype)
    g = torch.randn_like(x)
    with deterministic():  # bitwise comparison: no dQ atomics
        ye, ge = run_and_grads(lambda m, x: m(x), m, x, g)
        yc, gc = run_and_grads(lambda m, x: compiled(x), mc, x, g)
    assert torch.equal(ye, yc)
    for n in ge:
        assert torch.equal(ge[n], gc[n]), n


def test_block_forward_flops_match_eager_gemms():
    from torch.utils.flop_counter import FlopCounterMode

    from .test_flash_attention import math_attention

    m = FusedCheckpointedAttention(64, 4, 2, causal=False, head_dim=32, backend="aten")
    x = torch.randn(2, 7, 64)

    def eager():
        B, S, _ = x.shape
        q = m.q_proj(x).view(B, S, 4, 32)
        k, v = m.k_proj(x).view(B, S, 2, 32), m.v_proj(x).view(B, S, 2, 32)
        return m.o_proj(math_attention(q, k, v).reshape(B, S, -1))

    counts = []
    for fn in (lambda: m(x), eager):
        c = FlopCounterMode(display=False)
        with c:
            fn()
        counts.append(c.get_total_flops())
    assert counts[0] == counts[1] > 0
