"""FusedCheckpointedBlock: numerics against an independent float64 block, saved bytes, FLOPs."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fused_ckpt import FusedCheckpointedBlock
from fused_ckpt.modules.block import NORM_NAMES
from fused_ckpt.reference import ffn_reference

from .helpers import SavedTensors, assert_close_by_rule

B, S, D_MODEL, HEADS, KV_HEADS, D_FF = 2, 9, 64, 2, 1, 48


def _rope(t, theta):  # t: (B, S, H, D), Hugging Face rotate_half convention
    D = t.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    ang = torch.arange(t.shape[1], dtype=torch.float32)[:, None] * inv
    emb = torch.cat([ang, ang], -1)
    cos, sin = emb.cos().to(t.dtype)[None, :, None], emb.sin().to(t.dtype)[None, :, None]
    rot = torch.cat([-t[..., D // 2:], t[..., :D // 2]], -1)
    return t * cos + rot * sin


def reference_block(blk: FusedCheckpointedBlock, p: dict, x: torch.Tensor) -> torch.Tensor:
    """The same block in plain PyTorch (SDPA attention), with parameters ``p`` by name, for the
    block's norm placement and kind (``norm_offset``: Gemma's ``(1 + w)``)."""
    def norm(t, i):
        prefix = NORM_NAMES[blk.placement].get(i)
        if prefix is None:
            return t
        if blk.norm == "rmsnorm":
            tf = t.float() if t.dtype != torch.float64 else t
            y = tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + blk.norm_eps)
            return (y * (p[f"{prefix}.weight"].to(y.dtype) + blk.norm_offset)).to(t.dtype)
        return F.layer_norm(t, t.shape[-1:], p[f"{prefix}.weight"], p[f"{prefix}.bias"], blk.norm_eps)

    def ffn(t):
        return ffn_reference(t, p["mlp.fc1.weight"], p.get("mlp.fc1.bias"), p["mlp.fc2.weight"],
                             p.get("mlp.fc2.bias"), blk.mlp.activation)

    a = blk.self_attn
    n1 = norm(x, 1)
    lin = lambda t, n: F.linear(t, p[f"self_attn.{n}.weight"], p.get(f"self_attn.{n}.bias"))  # noqa: E731
    q = lin(n1, "q_proj").view(B, S, a.n_heads, a.head_dim)
    k = lin(n1, "k_proj").view(B, S, a.n_kv_heads, a.head_dim)
    v = lin(n1, "v_proj").view(B, S, a.n_kv_heads, a.head_dim)
    q, k = _rope(q, a.rope_theta), _rope(k, a.rope_theta)
    rep = a.n_heads // a.n_kv_heads
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(rep, 2).transpose(1, 2),
                                       v.repeat_interleave(rep, 2).transpose(1, 2), is_causal=True)
    attn = norm(lin(o.transpose(1, 2).reshape(B, S, -1), "o_proj"), 3)
    if blk.placement == "parallel":
        return x + attn + ffn(norm(x, 2))
    h = x + attn
    return h + norm(ffn(norm(h, 2)), 4)


def _make(norm="rmsnorm", activation="swiglu", recompute="full", dtype=torch.float32, backend="aten", **kw):
    torch.manual_seed(0)
    blk = FusedCheckpointedBlock(D_MODEL, HEADS, D_FF, KV_HEADS, activation=activation, norm=norm,
                                 recompute=recompute, dtype=dtype, backend=backend, **kw)
    with torch.no_grad():  # non-trivial norm weights
        for n, prm in blk.named_parameters():
            if "layernorm" in n and n.endswith("weight"):
                prm.uniform_(0.5, 1.5) if not blk.norm_offset else prm.uniform_(-0.5, 0.5)
            elif "layernorm" in n or n.endswith("bias"):
                prm.uniform_(-0.3, 0.3)
    return blk


def _ref_grads(blk, x, g, dtype):
    p = {n: t.detach().to(dtype).requires_grad_() for n, t in blk.named_parameters()}
    xr = x.detach().to(dtype).requires_grad_()
    y = reference_block(blk, p, xr)
    y.backward(g.to(dtype))
    return y.detach(), xr.grad, {n: t.grad for n, t in p.items()}


def check_block(blk, dtype):
    x = torch.randn(B, S, D_MODEL, dtype=dtype, requires_grad=True)
    y = blk(x)
    g = torch.randn_like(y)
    y.backward(g)
    y64, dx64, dp64 = _ref_grads(blk, x, g, torch.float64)
    ypt, dxpt, dppt = _ref_grads(blk, x, g, dtype)
    assert_close_by_rule(y, y64, ypt, "y")
    assert_close_by_rule(x.grad, dx64, dxpt, "dx")
    for n, prm in blk.named_parameters():
        assert_close_by_rule(prm.grad, dp64[n], dppt[n], f"d{n}")


@pytest.mark.parametrize("backend", ["aten", "triton"])
@pytest.mark.parametrize("recompute", ["full", None])
@pytest.mark.parametrize("norm,activation", [("rmsnorm", "swiglu"), ("layernorm", "gelu")])
def test_block_matches_float64(norm, activation, recompute, backend):
    check_block(_make(norm, activation, recompute, backend=backend), torch.float32)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=str)
def test_block_full_low_precision(dtype):
    check_block(_make(recompute="full", dtype=dtype, backend="triton"), dtype)


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_full_recompute_saves_x_and_norm_stats(norm):
    blk = _make(norm, recompute="full")
    x = torch.randn(B, S, D_MODEL, requires_grad=True)
    with SavedTensors() as s:
        y = blk(x)
    stats = 2 if norm == "layernorm" else 1
    expected = x.numel() * 4 + 2 * stats * B * S * 4
    assert s.total_bytes(blk.parameters()) == expected == blk.saved_bytes(B, S)
    y.sum().backward()


# norm kinds of the families: Llama RMSNorm, Gemma (1 + w) RMSNorm, LayerNorm with bias (GPT-2, NeoX)
NORM_KINDS = {"rms": dict(norm="rmsnorm"), "rms1p": dict(norm="rmsnorm", norm_offset=1.0),
              "ln_bias": dict(norm="layernorm", activation="gelu", bias=True)}


@pytest.mark.parametrize("recompute", ["full", None])
@pytest.mark.parametrize("kind", list(NORM_KINDS))
@pytest.mark.parametrize("placement", ["pre", "sandwich", "post", "parallel"])
def test_placements_match_float64(placement, kind, recompute):
    """Every norm placement with every norm kind: output, dx and every parameter gradient
    against the float64 block by the 2x rule (aten), whole-block and per-module paths."""
    kw = dict(NORM_KINDS[kind])
    blk = _make(kw.pop("norm"), kw.pop("activation", "swiglu"), recompute, placement=placement, **kw)
    assert sorted(n for n, _ in blk.named_children()) == sorted(
        ["self_attn", "mlp", *NORM_NAMES[placement].values()])
    check_block(blk, torch.float32)


@pytest.mark.triton
@pytest.mark.parametrize("placement,kind", [("sandwich", "rms1p"), ("parallel", "ln_bias")])
def test_placements_triton(placement, kind):
    kw = dict(NORM_KINDS[kind])
    check_block(_make(kw.pop("norm"), kw.pop("activation", "swiglu"), "full", backend="triton",
                      placement=placement, **kw), torch.float32)


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("placement,n_stats", [("pre", 2), ("sandwich", 4), ("post", 2), ("parallel", 1)])
def test_full_recompute_saves_x_and_each_norms_stats(placement, n_stats, norm):
    """"full" keeps x and the per-row statistics of each norm ("parallel": N2 shares N1's),
    as blk.saved_bytes and the planner's per-layer option predict."""
    from fused_ckpt.policy.discovery import build_layers  # noqa: F401 (the planner reads the block)

    blk = _make(norm, recompute="full", placement=placement)
    x = torch.randn(B, S, D_MODEL, requires_grad=True)
    with SavedTensors() as s:
        y = blk(x)
    stats = 2 if norm == "layernorm" else 1
    expected = x.numel() * 4 + n_stats * stats * B * S * 4
    assert s.total_bytes(blk.parameters()) == expected == blk.saved_bytes(B, S)
    y.sum().backward()
    blk.recompute = None  # per-module dials ("parallel": both norms save the same x, held once)
    with SavedTensors() as s:
        blk(x)
    assert s.unique_bytes(blk.parameters()) == blk.saved_bytes(B, S)
    assert s.total_bytes(blk.parameters()) == blk.saved_bytes(B, S) + (x.numel() * 4 if placement == "parallel" else 0)


def test_bad_placement_arguments():
    with pytest.raises(ValueError, match="placement must be one of"):
        FusedCheckpointedBlock(D_MODEL, HEADS, D_FF, placement="postnorm")
    with pytest.raises(ValueError, match="norm_offset"):
        FusedCheckpointedBlock(D_MODEL, HEADS, D_FF, norm="layernorm", norm_offset=1.0)


@pytest.mark.parametrize("attn,ffn", [("qkv", True), ("all", False), (False, "none")])
def test_module_mode_saved_bytes_match_prediction(attn, ffn):
    blk = _make(recompute=None, attn_recompute=attn, ffn_recompute=ffn)
    x = torch.randn(B, S, D_MODEL, requires_grad=True)
    with SavedTensors() as s:
        blk(x)
    assert s.total_bytes(blk.parameters()) == blk.saved_bytes(B, S)


def _flops(blk, x):
    c = FlopCounterMode(display=False)
    with c:
        blk(x).sum().backward()
    return c.get_total_flops()


def test_full_recompute_flops_are_eager_plus_attention_half_forward_plus_fc1():
    x = torch.randn(B, S, D_MODEL, requires_grad=True)
    full = _make(recompute="full")
    eager_like = _make(recompute=None, attn_recompute=False, ffn_recompute="none")
    eager_like.load_state_dict(full.state_dict())
    _flops(full, x), _flops(eager_like, x)  # warm up (first custom-op calls under the mode)
    a = full.self_attn
    T, d, hd = B * S, D_MODEL, a.head_dim
    qkv = 2 * T * d * (a.n_heads + 2 * a.n_kv_heads) * hd
    core = 4 * B * a.n_heads * S * S * hd // 2  # causal
    o_proj = 2 * T * a.n_heads * hd * d
    fc1 = 2 * T * d * 2 * D_FF  # gated up-projection recomputed inside the FFN backward
    assert _flops(full, x) - _flops(eager_like, x) == qkv + core + o_proj + fc1


def test_full_recompute_frozen_params_and_no_grad():
    blk = _make(recompute="full")
    for n, prm in blk.named_parameters():
        prm.requires_grad_(n.startswith("mlp."))
    x = torch.randn(B, S, D_MODEL)
    blk(x).sum().backward()
    assert blk.mlp.fc1.weight.grad is not None and blk.self_attn.q_proj.weight.grad is None
    with torch.no_grad(), SavedTensors() as s:
        blk(x)
    assert s.saved == []


@pytest.mark.parametrize("norm", ["rmsnorm", "layernorm"])
def test_full_recompute_under_autocast_is_bitwise_the_module_path(norm):
    """The whole-block backward recomputes under the forward's autocast state (as
    torch.utils.checkpoint does): output and every gradient equal recompute=None's bitwise."""
    x = torch.randn(B, S, D_MODEL)
    g = torch.randn(B, S, D_MODEL)
    out = {}
    for rc in ("full", None):
        blk = _make(norm=norm, recompute=rc, bias=True)
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = blk(xg)
        y.backward(g)
        out[rc] = (y, xg.grad, {n: prm.grad for n, prm in blk.named_parameters()})
    (y1, dx1, g1), (y2, dx2, g2) = out["full"], out[None]
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)
    assert set(g1) == set(g2) and all(g1[n].dtype == torch.float32 for n in g1)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n
    assert dx1.abs().sum() > 0


def test_full_recompute_compiles_fullgraph():
    """The whole-block backward is a chain of the ops' own backward functions (no autograd
    graph inside it), so torch.compile(fullgraph=True) traces the block; same results bitwise."""
    blk = _make(recompute="full", bias=True)
    x = torch.randn(B, S, D_MODEL)
    pos = torch.arange(3, 3 + S)[None].expand(B, S)
    kpm = torch.ones(B, S, dtype=torch.bool)
    kpm[-1, S // 2:] = False
    g = torch.randn(B, S, D_MODEL)
    runs = []
    for fn in (blk, torch.compile(blk, fullgraph=True)):
        blk.zero_grad()
        xg = x.clone().requires_grad_()
        y = fn(xg, pos, kpm)
        y.backward(g)
        runs.append((y.detach(), xg.grad, {n: prm.grad.clone() for n, prm in blk.named_parameters()}))
    (y1, dx1, g1), (y2, dx2, g2) = runs
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n


def test_bad_block_arguments():
    with pytest.raises(ValueError, match="norm must be"):
        FusedCheckpointedBlock(64, 2, 48, norm="batchnorm")
    with pytest.raises(ValueError, match="recompute must be one of"):
        FusedCheckpointedBlock(64, 2, 48, recompute="some")
    blk = _make()
    with pytest.raises(ValueError, match=r"\(batch, seqlen, d_model\)"):
        blk(torch.randn(S, D_MODEL, requires_grad=True))
    assert math.isfinite(blk(torch.randn(1, 3, D_MODEL)).sum().item())


def _measured(model, x):
    with SavedTensors() as s:
        model(x)
    return s.total_bytes(list(model.parameters()))


def test_policies_choose_whole_block_recompute_and_predictions_hold():
    from torch import nn

    from fused_ckpt import EveryN, MemoryBudget, apply_checkpointing

    model = nn.Sequential(_make(recompute=None), _make(recompute=None))
    x = torch.randn(B, S, D_MODEL, requires_grad=True)
    # "full": every block recomputes as a whole, keeping x and the norm statistics
    plan = apply_checkpointing(model, "full", batch=B, seq=S)
    assert all(b.recompute == "full" for b in model)
    assert [r.kind for r in plan.rows] == ["block", "block"]
    assert _measured(model, x) == sum(r.saved_bytes for r in plan.rows) == 2 * model[0].saved_bytes(B, S)
    # EveryN(2): block 0 whole, block 1 at the no-recompute dials (its block mode released)
    plan = apply_checkpointing(model, EveryN(2), batch=B, seq=S)
    assert model[0].recompute == "full" and model[1].recompute is None
    assert model[1].self_attn.recompute is False and model[1].mlp.recompute == "none"
    assert _measured(model, x) == sum(r.saved_bytes for r in plan.rows)
    # MemoryBudget at the full-recompute minimum must pick whole-block recompute everywhere, and
    # its FLOP prediction is what FlopCounterMode counts beyond the no-recompute model
    minimum = 2 * model[0].saved_bytes(B, S) if model[0].recompute == "full" else None
    plan = apply_checkpointing(model, MemoryBudget(minimum, batch=B, seq=S))
    assert all(b.recompute == "full" for b in model)
    assert _measured(model, x) == minimum
    full_flops = sum(r.recompute_flops for r in plan.rows)
    eager_like = nn.Sequential(_make(recompute=None, attn_recompute=False, ffn_recompute="none"),
                               _make(recompute=None, attn_recompute=False, ffn_recompute="none"))
    eager_like.load_state_dict(model.state_dict())
    _flops(model, x), _flops(eager_like, x)  # warm-up
    assert _flops(model, x) - _flops(eager_like, x) == full_flops


@pytest.mark.parametrize("placement", ["sandwich", "parallel"])
def test_replayed_dropouts_softcap_window_match_autograd_of_the_same_ops(placement):
    """Softcap, window and the three replayed dropouts (attention probabilities, attention and FFN
    branch outputs): the whole-block backward (explicit chain, masks regenerated from the seeds
    saved as ints) equals autograd through the same ops with the same seeds, and the forward is
    bitwise the same; ``torch.manual_seed`` reproduces the masks; nothing beyond x and the norm
    statistics is kept."""
    from fused_ckpt.ops.block import PARAM_NAMES, BlockFullRecompute, block_forward_math, draw_seeds

    blk = _make(placement=placement)
    spec = dataclasses.replace(blk._spec(), softcap=3.0, window=4, dropout_p=0.2, out_dropout_p=0.1,
                               ffn_dropout_p=0.3)
    x = torch.randn(B, S, D_MODEL, requires_grad=True)
    g = torch.randn(B, S, D_MODEL)
    params = blk._params()
    torch.manual_seed(5)
    with SavedTensors() as s:
        y = BlockFullRecompute.apply(spec, x, None, None, *params)
    stats = 1 if placement == "parallel" else 4
    assert s.total_bytes(blk.parameters()) == x.numel() * 4 + stats * B * S * 4
    got = torch.autograd.grad(y, [x] + [t for t in params if t is not None], g)
    torch.manual_seed(5)
    seeds = draw_seeds(spec)
    assert sorted(seeds) == ["dropout_p", "ffn_dropout_p", "out_dropout_p"]
    y_ref, _ = block_forward_math(spec, x, dict(zip(PARAM_NAMES, params)), None, None, seeds)
    want = torch.autograd.grad(y_ref, [x] + [t for t in params if t is not None], g)
    assert torch.equal(y, y_ref)
    no_drop = BlockFullRecompute.apply(dataclasses.replace(spec, dropout_p=0.0, out_dropout_p=0.0,
                                                           ffn_dropout_p=0.0), x, None, None, *params)
    assert (no_drop - y).abs().max() > 0.1  # the dropouts did something
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
