"""The attention block op's family features: QK-norm (per head and over the whole projection,
plain and Gemma's ``(1 + w)``), partial rotary and packed q/k/v layouts (rows [q; k; v], a
Conv1D weight read transposed, GPT-NeoX's per-head interleaving). Each case is checked against a
float64 PyTorch reference with a random upstream gradient, output and every gradient by the 2x
rule, on the aten backend and the Triton kernels (tiny shapes under the interpreter)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fused_ckpt import fused_attention_block
from fused_ckpt.ops.attention import attn_block_backward, attn_block_forward, rope_tables

from .conftest import DEVICE
from .helpers import SavedTensors, assert_close_by_rule

DEV = DEVICE
BACKENDS = [pytest.param("triton", marks=pytest.mark.triton), "aten"]
D = 32


def _rot_half(t):
    h = t.shape[-1] // 2
    return torch.cat((-t[..., h:], t[..., :h]), -1)


def reference(x, p, H, Hkv, *, theta=1e4, pos=None, q_norm=None, k_norm=None, eps=1e-6, offset=0.0,
              rotary_dim=None, layout="separate", scale=None):
    """Plain PyTorch in x's dtype: projections (per layout), RMSNorm, partial rotary with
    Hugging Face's fp32 tables, causal softmax attention, output projection."""
    B, S, _ = x.shape
    if layout == "separate":
        q, k, v = F.linear(x, p["wq"], p["bq"]), F.linear(x, p["wk"], p["bk"]), F.linear(x, p["wv"], p["bv"])
    elif layout == "packed":
        q, k, v = F.linear(x, p["wq"], p["bq"]).split([H * D, Hkv * D, Hkv * D], -1)
    else:  # neox: rows interleaved per head
        q, k, v = F.linear(x, p["wq"], p["bq"]).view(B, S, H, 3 * D).chunk(3, -1)
    q, k, v = (t.reshape(B, S, -1, D) for t in (q, k, v))

    def norm(t, w):
        if w is None:
            return t
        flat = t if w.shape[0] == D else t.reshape(B, S, -1)
        y = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + eps) * (w + offset)
        return y.view(t.shape)

    q, k = norm(q, q_norm), norm(k, k_norm)
    if theta is not None:
        R = D if rotary_dim is None else rotary_dim
        cos, sin = rope_tables(pos, S, R, theta, x.device)
        cos, sin = (torch.cat((t, t), -1)[:, :, None].to(x.dtype) for t in (cos, sin))

        def rope(t):
            r, rest = t[..., :R], t[..., R:]
            return torch.cat((r * cos + _rot_half(r) * sin, rest), -1)

        q, k = rope(q), rope(k)
    k, v = (t.repeat_interleave(H // Hkv, 2) for t in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * (scale if scale is not None else D ** -0.5)
    s = s.masked_fill(~torch.ones(S, S, dtype=torch.bool, device=x.device).tril(), float("-inf"))
    o = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v).reshape(B, S, H * D)
    return F.linear(o, p["wo"], p["bo"])


def make_params(d, H, Hkv, layout, bias, q_norm=None, k_norm=None, conv1d=False, seed=0):
    """fp32 leaf tensors; ``conv1d``: the packed weight is stored [d, rows] and passed as ``.t()``."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, sd=0.2: (torch.randn(*s, generator=g) * sd).to(DEV)  # noqa: E731
    leaves = {}
    if layout == "separate":
        leaves.update(wq=r(H * D, d), wk=r(Hkv * D, d), wv=r(Hkv * D, d))
        if bias:
            leaves.update(bq=r(H * D, sd=0.5), bk=r(Hkv * D, sd=0.5), bv=r(Hkv * D, sd=0.5))
    else:
        rows = (H + 2 * Hkv) * D
        leaves["wq"] = r(d, rows) if conv1d else r(rows, d)
        if bias:
            leaves["bq"] = r(rows, sd=0.5)
    leaves["wo"] = r(d, H * D)
    if bias:
        leaves["bo"] = r(d, sd=0.5)
    if q_norm is not None:
        leaves["q_norm"] = 1 + r(q_norm, sd=0.3)
        leaves["k_norm"] = 1 + r(k_norm, sd=0.3)
    return leaves


def as_args(leaves, conv1d=False):
    p = {n: leaves.get(n) for n in ("wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "q_norm", "k_norm")}
    if conv1d:
        p["wq"] = p["wq"].t()
    return p


def run(fn, leaves, x, g, conv1d=False):
    leaves = {n: t.detach().clone().requires_grad_() for n, t in leaves.items()}
    x = x.detach().clone().requires_grad_()
    y = fn(x, as_args(leaves, conv1d))
    y.backward(g.to(y.dtype))
    return y.detach(), {"dx": x.grad, **{n: t.grad for n, t in leaves.items()}}


CASES = {
    # name: (H, Hkv, layout, bias, q_norm rows, k_norm rows, offset, rotary_dim, conv1d)
    "qknorm_head": (4, 2, "separate", True, D, D, 0.0, None, False),
    "qknorm_proj_gemma": (2, 1, "separate", False, 2 * D, D, 1.0, None, False),
    "partial_rotary": (2, 2, "separate", True, None, None, 0.0, 16, False),
    "partial_rotary_odd_half": (2, 1, "separate", False, D, D, 0.0, 24, False),
    "packed_rows": (4, 2, "packed", True, None, None, 0.0, None, False),
    "packed_conv1d": (2, 2, "packed", True, None, None, 0.0, None, True),
    "neox": (2, 2, "neox", True, None, None, 0.0, 8, False),
    "packed_qknorm": (2, 1, "packed", False, D, D, 1.0, None, False),
}


def _check_case(case, backend, recompute, B, S, seed=0, dtype=torch.float32):
    H, Hkv, layout, bias, qn, kn, offset, rdim, conv1d = CASES[case]
    d = 64
    leaves = make_params(d, H, Hkv, layout, bias, qn, kn, conv1d, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, S, d, generator=gen).to(DEV)
    g = torch.randn(B, S, d, generator=gen).to(DEV)
    pos = (torch.arange(S) + 3)[None].expand(B, S).to(DEV)
    kw = dict(q_norm=None, k_norm=None, eps=1e-6, offset=offset, rotary_dim=rdim, layout=layout)

    def ref(x, p):
        return reference(x, p, H, Hkv, pos=pos, **{**kw, "q_norm": p["q_norm"], "k_norm": p["k_norm"]})

    def fused(x, p):
        return fused_attention_block(x, p["wq"], p["bq"], p["wk"], p["bk"], p["wv"], p["bv"], p["wo"], p["bo"], H, Hkv,
                                     rope_theta=1e4, position_ids=pos, recompute=recompute, backend=backend,
                                     q_norm=p["q_norm"], k_norm=p["k_norm"], qk_norm_eps=1e-6, qk_norm_offset=offset,
                                     rotary_dim=rdim, qkv_layout=layout)

    y64, g64 = run(ref, {n: t.double() for n, t in leaves.items()}, x.double(), g, conv1d)
    low = {n: t.to(dtype) for n, t in leaves.items()}
    y32, g32 = run(ref, low, x.to(dtype), g, conv1d)  # PyTorch in the tested dtype
    yf, gf = run(fused, low, x.to(dtype), g, conv1d)
    assert_close_by_rule(yf, y64, y32, f"{case} y")
    assert set(gf) == set(g64)
    top = max(t.abs().max().item() for t in g64.values())
    for n in g64:
        assert gf[n] is not None, f"{case}: no gradient for {n}"
        if S == 1 and not g64[n].any():  # one key: the softmax is 1 whatever q is, dq = 0 exactly
            assert gf[n].abs().max().item() <= 64 * torch.finfo(dtype).eps * top, f"{case} {n}"
            continue
        assert_close_by_rule(gf[n], g64[n], g32[n], f"{case} {n}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_features_match_float64(case, backend):
    _check_case(case, backend, "qkv", 2, 7)


@pytest.mark.parametrize("recompute", ["all", False])
@pytest.mark.parametrize("case", ["qknorm_head", "qknorm_proj_gemma", "neox"])
def test_features_every_recompute_mode(case, recompute):
    _check_case(case, "aten", recompute, 1, 6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["qknorm_proj_gemma", "neox"])
def test_features_half_precision(case, dtype):
    """bf16 / fp16 on the aten backend (the interpreter's bf16 dots are not exact, see README):
    the (1 + w) weight is formed in fp32, the norm and rotary run in fp32 and round once."""
    _check_case(case, "aten", "qkv", 2, 7, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_features_one_token(backend):
    _check_case("packed_qknorm", backend, False, 1, 1)
    _check_case("partial_rotary_odd_half", backend, "all", 1, 1)


def test_qk_norm_saves_nothing_more():
    """QK-norm is recomputed: every mode keeps exactly the bytes it keeps without the norm
    (with False, the q and k it keeps are the projections before the norm)."""
    leaves = make_params(64, 2, 1, "separate", False, D, D)
    x = torch.randn(2, 5, 64, device=DEV)
    for recompute in ("all", "qkv", False):
        sizes = []
        for norms in (False, True):
            p = as_args({n: t.requires_grad_() for n, t in leaves.items()})
            with SavedTensors() as st:
                y = fused_attention_block(x, p["wq"], None, p["wk"], None, p["wv"], None, p["wo"], None, 2, 1,
                                          rope_theta=1e4, recompute=recompute, backend="aten",
                                          q_norm=p["q_norm"] if norms else None, k_norm=p["k_norm"] if norms else None)
            sizes.append(st.total_bytes(leaves.values()))
            y.sum().backward()
        assert sizes[0] == sizes[1] > 0, (recompute, sizes)


def test_packed_gradients_are_laid_out_as_the_weight():
    """The packed gradient lands on the Parameter in its own layout (a Conv1D weight read as
    ``w.t()`` gets a contiguous ``[d, rows]`` gradient, no layout copy needed)."""
    leaves = make_params(64, 2, 2, "packed", True, conv1d=True)
    p = as_args({n: t.requires_grad_() for n, t in leaves.items()}, conv1d=True)
    y = fused_attention_block(torch.randn(1, 4, 64, device=DEV), p["wq"], p["bq"], None, None, None, None, p["wo"],
                              p["bo"], 2, 2, recompute="qkv", backend="aten", qkv_layout="packed")
    y.sum().backward()
    assert leaves["wq"].grad.shape == leaves["wq"].shape and leaves["wq"].grad.is_contiguous()


def test_feature_input_errors():
    leaves = as_args(make_params(64, 2, 1, "separate", False))
    x = torch.randn(1, 3, 64, device=DEV)
    args = (x, leaves["wq"], None, leaves["wk"], None, leaves["wv"], None, leaves["wo"], None, 2, 1)
    with pytest.raises(ValueError, match=r"q_norm has shape \(5,\)"):
        fused_attention_block(*args, rope_theta=1e4, q_norm=torch.ones(5, device=DEV), backend="aten")
    with pytest.raises(ValueError, match="rotary_dim must be an even int"):
        fused_attention_block(*args, rope_theta=1e4, rotary_dim=7, backend="aten")
    with pytest.raises(ValueError, match="no rotary embedding"):
        fused_attention_block(*args, rotary_dim=8, backend="aten")
    with pytest.raises(ValueError, match="wk must be None"):
        fused_attention_block(*args, qkv_layout="packed", backend="aten")
    with pytest.raises(ValueError, match="qkv_layout must be"):
        fused_attention_block(*args, qkv_layout="fused", backend="aten")
    packed = torch.randn(4 * D, 64, device=DEV)
    with pytest.raises(ValueError, match=r"packed qkv weight has shape \(128, 64\), expected \(\d+, 64\)"):
        fused_attention_block(x, packed, None, None, None, None, None, leaves["wo"], None, 2, 2, qkv_layout="packed",
                              backend="aten")
    with pytest.raises(ValueError, match="n_kv_heads=1 must equal n_heads=2"):
        fused_attention_block(x, packed, None, None, None, None, None, leaves["wo"], None, 2, 1, qkv_layout="neox",
                              backend="aten")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_block_ops_with_features(backend):
    leaves = make_params(64, 2, 2, "neox", True, D, D)
    p = as_args(leaves)
    x = torch.randn(1, 5, 64, device=DEV)
    args = (x, p["wq"], p["bq"], None, None, None, None, p["wo"], p["bo"], None, None, 2, 2, True, 0.2, 1e4)
    kw = dict(q_norm=p["q_norm"], k_norm=p["k_norm"], qk_norm_eps=1e-5, qk_norm_offset=1.0, rotary_dim=16,
              qkv_layout="neox")
    # the Triton run (slow under the interpreter) checks the mode whose outputs include q, k, v
    for mode in ("qkv", "none") if backend == "aten" else ("none",):
        torch.library.opcheck(attn_block_forward, args + (mode, backend), kw)
    if backend != "aten":
        return
    y, o, lse, q, k, v = attn_block_forward(*args, "none", backend, **kw)
    torch.library.opcheck(attn_block_backward, (torch.randn_like(y), x, p["wq"], p["bq"], None, None, None, None,
                                                p["wo"], q, k, v, o, lse, None, None, 2, 2, True, 0.2, 1e4,
                                                [True] * 11, backend), kw)


def test_packed_layouts_count_the_same_flops():
    """The block op's FLOP formulas count a packed projection's GEMMs as the three separate ones
    (forward and backward, every recompute mode)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 8, 64, device=DEV)
    counts = {}
    for layout in ("separate", "packed", "neox"):
        p = as_args({n: t.requires_grad_() for n, t in make_params(64, 2, 2, layout, True).items()})
        for recompute in ("all", "qkv", False):
            with FlopCounterMode(display=False) as fc:
                fused_attention_block(x, p["wq"], p["bq"], p["wk"], p["bk"], p["wv"], p["bv"], p["wo"], p["bo"], 2, 2,
                                      rope_theta=1e4, recompute=recompute, backend="aten",
                                      qkv_layout=layout).sum().backward()
            counts[layout, recompute] = fc.get_total_flops()
    for recompute in ("all", "qkv", False):
        assert counts["packed", recompute] == counts["neox", recompute] == counts["separate", recompute] > 0
    assert counts["separate", "all"] > counts["separate", "qkv"] > counts["separate", False]
