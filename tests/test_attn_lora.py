"""The attention block op with LoRA adapters (:mod:`fused_ckpt.ops.attn_lora`).

Each case runs the op against a float64 PyTorch reference that takes the op's own LoRA dropout
masks (and attention-dropout mask), with a random upstream gradient: output, dx and every
adapter gradient by the 2x rule, on the aten backend and the Triton kernels (tiny shapes under
the interpreter); then the recompute modes, saved tensors counted exactly, zero tokens, a
non-contiguous upstream gradient, FLOP formulas against the counted GEMMs, opcheck and the
functional's input errors."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fused_ckpt import fused_attention_block
from fused_ckpt.ops import attn_lora as ops
from fused_ckpt.ops.attention import dropout_keep_mask, rope_tables
from fused_ckpt.ops.attn_lora import attn_lora_backward, attn_lora_forward, attn_lora_saved_bytes
from fused_ckpt.ops.ffn_lora import _keep

from .conftest import DEVICE
from .helpers import SavedTensors, SeeThrough, assert_close_by_rule

DEV = DEVICE
D, d, R = 32, 64, 4
LORA_SEED, LORA_OFFSET = 1234, 17
ATTN_SEED, ATTN_OFFSET = 99, 5


def _rot_half(t):
    h = t.shape[-1] // 2
    return torch.cat((-t[..., h:], t[..., :h]), -1)


# name: H, Hkv, layout, bias, qk-norm rows (q, k) or None, norm offset, rotary_dim (0: no rotary), conv1d,
#       adapters ("q" = the packed weight's in a packed layout), lora dropout p, attention options (softcap,
#       window, attention dropout p), key padding
CASES = {
    "gqa_all_adapters_dropout": (4, 2, "separate", True, None, 0.0, None, False, "qkvo", 0.25, (None, None, 0.0),
                                 True),
    "qknorm_head_q_o": (2, 1, "separate", False, (D, D), 0.0, None, False, "qo", 0.0, (None, None, 0.0), False),
    "packed_qknorm_gemma": (2, 1, "packed", True, (2 * D, D), 1.0, None, False, "qo", 0.1, (None, None, 0.0), False),
    "neox_partial": (2, 2, "neox", True, None, 0.0, 16, False, "q", 0.0, (None, None, 0.0), True),
    "conv1d_attn_dropout": (2, 2, "packed", True, None, 0.0, 0, True, "qo", 0.2, (None, None, 0.3), False),
    "softcap_window_kv": (2, 2, "separate", False, None, 0.0, None, False, "kv", 0.0, (20.0, 3, 0.0), False),
}


def make_case(case, B, S, seed=0):
    """(base tensors, LoRA factors [A_q, A_k, A_v, A_o], [B_q, ...], scalings, extras) in fp32."""
    H, Hkv, layout, bias, norms, offset, rdim, conv1d, which, p, attn_opts, padded = CASES[case]
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, sd=0.2: (torch.randn(*s, generator=g) * sd).to(DEV)  # noqa: E731
    base = dict.fromkeys(("wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo", "q_norm", "k_norm"))
    rows = {"q": H * D, "k": Hkv * D, "v": Hkv * D}
    if layout == "separate":
        base.update(wq=r(H * D, d), wk=r(Hkv * D, d), wv=r(Hkv * D, d))
        if bias:
            base.update(bq=r(H * D, sd=0.5), bk=r(Hkv * D, sd=0.5), bv=r(Hkv * D, sd=0.5))
    else:
        rows["q"] = (H + 2 * Hkv) * D
        base["wq"] = r(d, rows["q"]) if conv1d else r(rows["q"], d)
        if bias:
            base["bq"] = r(rows["q"], sd=0.5)
    base["wo"] = r(d, H * D)
    if bias:
        base["bo"] = r(d, sd=0.5)
    if norms is not None:
        base["q_norm"], base["k_norm"] = 1 + r(norms[0], sd=0.3), 1 + r(norms[1], sd=0.3)
    a_s, b_s, scalings = [], [], []
    for i, key in enumerate("qkvo"):
        if key in which:
            n_in, n_out = (d if key != "o" else H * D), (rows[key] if key != "o" else d)
            a_s.append(r(R, n_in, sd=0.3))
            b_s.append(r(n_out, R, sd=0.3))
            scalings.append(0.5 + i * 0.5)
        else:
            a_s.append(None)
            b_s.append(None)
            scalings.append(0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(B, S, d, generator=gen).to(DEV)
    dy = torch.randn(B, S, d, generator=gen).to(DEV)
    pos = (torch.arange(S) + 3)[None].expand(B, S).to(DEV)
    kpm = None
    if padded and S > 1:
        kpm = torch.ones(B, S, dtype=torch.bool, device=DEV)
        kpm[0, 0] = False  # one left-padded key: query 0 of batch 0 sees no key
    ex = dict(H=H, Hkv=Hkv, layout=layout, offset=offset, rdim=rdim, conv1d=conv1d, p=p, attn_opts=attn_opts,
              pos=pos if rdim != 0 else None, kpm=kpm, theta=None if rdim == 0 else 1e4)
    return base, a_s, b_s, scalings, x, dy, ex


def reference(x, base, a_s, b_s, scalings, ex):
    """Plain PyTorch in x's dtype with the op's masks: PEFT's lora.Linear per projection (the input
    cast to the factors' dtype, dropped, A, B, times scaling, added to the base output in the
    wider dtype and rounded back), RMSNorm, partial rotary, softmax attention with softcap /
    window / padding / dropout, o_proj with its adapter."""
    B, S, _ = x.shape
    H, Hkv, layout = ex["H"], ex["Hkv"], ex["layout"]
    T = B * S
    p = ex["p"]

    def lin(inp, w, b, i):
        out = F.linear(inp, w, b)
        if a_s[i] is None:
            return out
        t = inp.reshape(T, -1).to(a_s[i].dtype)
        if p > 0:
            keep = _keep(LORA_SEED, LORA_OFFSET + i, p, 0, T, t.shape[1], t.device)
            t = t * keep / (1 - p)
        low = F.linear(F.linear(t, a_s[i]), b_s[i]) * scalings[i]
        return (out.reshape(T, -1) + low).to(out.dtype).view(out.shape)

    wq = base["wq"].t() if ex["conv1d"] else base["wq"]
    if layout == "separate":
        q, k, v = lin(x, wq, base["bq"], 0), lin(x, base["wk"], base["bk"], 1), lin(x, base["wv"], base["bv"], 2)
    elif layout == "packed":
        q, k, v = lin(x, wq, base["bq"], 0).split([H * D, Hkv * D, Hkv * D], -1)
    else:
        q, k, v = lin(x, wq, base["bq"], 0).view(B, S, H, 3 * D).chunk(3, -1)
    q, k, v = (t.reshape(B, S, -1, D) for t in (q, k, v))

    def norm(t, w):
        if w is None:
            return t
        flat = t if w.shape[0] == D else t.reshape(B, S, -1)
        y = flat * torch.rsqrt(flat.square().mean(-1, keepdim=True) + 1e-6) * (w + ex["offset"])
        return y.view(t.shape)

    q, k = norm(q, base["q_norm"]), norm(k, base["k_norm"])
    if ex["theta"] is not None:
        rd = ex["rdim"] or D
        cos, sin = rope_tables(ex["pos"], S, rd, ex["theta"], x.device)
        cos, sin = (torch.cat((t, t), -1)[:, :, None].to(x.dtype) for t in (cos, sin))

        def rope(t):
            rr, rest = t[..., :rd], t[..., rd:]
            return torch.cat((rr * cos + _rot_half(rr) * sin, rest), -1)

        q, k = rope(q), rope(k)
    k, v = (t.repeat_interleave(H // Hkv, 2) for t in (k, v))
    softcap, window, attn_p = ex["attn_opts"]
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * D ** -0.5
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    i, j = torch.arange(S, device=x.device)[:, None], torch.arange(S, device=x.device)[None]
    visible = j <= i
    if window is not None:
        visible = visible & (j > i - window)
    visible = visible[None, None]
    if ex["kpm"] is not None:
        visible = visible & ex["kpm"][:, None, None, :]
    prob = s.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)
    if attn_p > 0:
        idx = torch.arange(S, device=x.device)
        prob = prob * dropout_keep_mask(ATTN_SEED, ATTN_OFFSET, attn_p, B, H, idx, idx) / (1 - attn_p)
    o = torch.einsum("bhqk,bkhd->bqhd", prob, v).reshape(B, S, H * D)
    return lin(o, base["wo"], base["bo"], 3)


def _op_kwargs(ex):
    softcap, window, attn_p = ex["attn_opts"]
    return dict(q_norm=None, k_norm=None, qk_norm_eps=1e-6, qk_norm_offset=ex["offset"],
                rotary_dim=ex["rdim"] or None, qkv_layout=ex["layout"], softcap=softcap, window=window,
                dropout_p=attn_p, seed=ATTN_SEED, rng_offset=ATTN_OFFSET, lora_dropout_p=ex["p"],
                lora_seed=LORA_SEED, lora_offset=LORA_OFFSET)


def fused(x, base, a_s, b_s, scalings, ex, mode, backend):
    wq = base["wq"].t() if ex["conv1d"] else base["wq"]
    kw = _op_kwargs(ex)
    kw.update(q_norm=base["q_norm"], k_norm=base["k_norm"])
    return attn_lora_forward(x, wq, base["bq"], base["wk"], base["bk"], base["wv"], base["bv"], base["wo"],
                             base["bo"], *a_s, *b_s, scalings, ex["pos"], ex["kpm"], ex["H"], ex["Hkv"], True,
                             D ** -0.5, ex["theta"], mode, backend, **kw)[0]


def run(fn, x, base, a_s, b_s, scalings, ex, dy, dtype=None, factor_dtype=None):
    """(y, {"dx", "A_q", "B_q", ...: grad}) of ``fn`` on copies cast to ``dtype`` (factors to
    ``factor_dtype``, default the same)."""
    dtype = dtype or x.dtype
    fdt = factor_dtype or dtype
    base = {n: (t.detach().to(dtype, copy=True) if t is not None else None) for n, t in base.items()}
    xs = x.detach().to(dtype, copy=True).requires_grad_()
    a_s = [a.detach().to(fdt, copy=True).requires_grad_() if a is not None else None for a in a_s]
    b_s = [b.detach().to(fdt, copy=True).requires_grad_() if b is not None else None for b in b_s]
    ex = dict(ex)
    y = fn(xs, base, a_s, b_s, scalings, ex)
    y.backward(dy.to(y.dtype))
    grads = {"dx": xs.grad}
    for key, a, b in zip("qkvo", a_s, b_s):
        if a is not None:
            grads[f"A_{key}"], grads[f"B_{key}"] = a.grad, b.grad
    return y.detach(), grads


def check_case(case, backend, mode, B=2, S=6, dtype=torch.float32, factor_dtype=None):
    base, a_s, b_s, scalings, x, dy, ex = make_case(case, B, S)
    y64, g64 = run(reference, x, base, a_s, b_s, scalings, ex, dy, torch.float64)
    ypt, gpt = run(reference, x, base, a_s, b_s, scalings, ex, dy, dtype, factor_dtype)
    yf, gf = run(lambda *a: fused(*a, mode, backend), x, base, a_s, b_s, scalings, ex, dy, dtype, factor_dtype)
    assert_close_by_rule(yf, y64, ypt, f"{case} y")
    assert set(gf) == set(g64) and len(gf) == 1 + 2 * sum(a is not None for a in a_s)
    for n in g64:
        assert gf[n] is not None, f"{case}: no gradient for {n}"
        assert gf[n].dtype == gpt[n].dtype, n
        assert_close_by_rule(gf[n], g64[n], gpt[n], f"{case} {mode} {n}")


@pytest.mark.parametrize("case", list(CASES))
def test_attn_lora_matches_float64(case):
    check_case(case, "aten", "qkv")


@pytest.mark.triton
@pytest.mark.parametrize("case", list(CASES))
def test_attn_lora_triton_matches_float64(case):
    """The Triton attention core in fp16 (factors too). Not fp32: there the FlashAttention-2
    backward's dq (P from the stored lse, delta = rowsum(dO * O) from the stored O) has up to ~3x
    eager's error, and the rank-r B_q gradient (s dZ_q^T t_q, 128 x 4 values) measured 1.3-2.8x
    PyTorch's fp32 error over seeds (aten: 0.9-1.3x), so the 2x rule would test the kernel's
    fp32 margin rather than the LoRA terms."""
    check_case(case, "triton", "qkv", dtype=torch.float16)


@pytest.mark.parametrize("mode", ["all", "none"])
@pytest.mark.parametrize("case", ["gqa_all_adapters_dropout", "packed_qknorm_gemma", "conv1d_attn_dropout"])
def test_attn_lora_every_recompute_mode(case, mode):
    check_case(case, "aten", mode)


def test_attn_lora_dropout_over_row_chunks(monkeypatch):
    """With LoRA dropout the rank-r products run over row chunks (bounded Philox temporaries):
    chunks of 5 rows (x) and 2 rows (o) here, the masks still the reference's."""
    monkeypatch.setattr(ops, "ATEN_CHUNK", 5 * d)
    check_case("gqa_all_adapters_dropout", "aten", "all")


@pytest.mark.triton
def test_attn_lora_triton_recompute_all():
    check_case("neox_partial", "triton", "all", B=1, S=5, dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attn_lora_half_precision_with_fp32_factors(dtype):
    """PEFT's default for a 16-bit model: factors in fp32, the LoRA term formed in fp32 and added
    to the base output before rounding once (aten: the interpreter's bf16 dots are not exact)."""
    check_case("packed_qknorm_gemma", "aten", "qkv", dtype=dtype, factor_dtype=torch.float32)
    check_case("gqa_all_adapters_dropout", "aten", "all", dtype=dtype, factor_dtype=dtype)


def _counted(case, B, S, mode, requires_x=True):
    base, a_s, b_s, scalings, x, dy, ex = make_case(case, B, S)
    a_s = [a.requires_grad_() if a is not None else None for a in a_s]
    b_s = [b.requires_grad_() if b is not None else None for b in b_s]
    x.requires_grad_(requires_x)
    with SavedTensors() as st:
        y = fused(x, base, a_s, b_s, scalings, ex, mode, "aten")
    params = [t for t in list(base.values()) + a_s + b_s if t is not None]
    got = st.total_bytes(params)
    y.backward(dy)
    return got, ex, a_s, x


@pytest.mark.parametrize("mode", ["all", "qkv", "none"])
def test_attn_lora_saves_the_contract_exactly(mode):
    """Saved bytes (parameters and factors excluded) = the block op's for the mode + one
    ``[tokens, r]`` product per adapter, with LoRA dropout too (the masks are regenerated)."""
    B, S = 2, 5
    for case in ("gqa_all_adapters_dropout", "qknorm_head_q_o"):
        got, ex, a_s, x = _counted(case, B, S, mode)
        ranks = tuple(a.shape[0] for a in a_s if a is not None)
        want = attn_lora_saved_bytes(B * S, d, ex["H"], ex["Hkv"], D, mode, ranks, 4)
        if ex["kpm"] is not None:
            want += ex["kpm"].numel()
        if ex["pos"] is not None:
            want += ex["pos"].numel() * 8
        assert got == want > 0, (case, mode, got, want)


def test_attn_lora_zero_tokens():
    """S = 0: an empty output, a zero dx, and zero (not missing) adapter gradients."""
    for mode in ("all", "qkv", "none"):
        base, a_s, b_s, scalings, x, dy, ex = make_case("gqa_all_adapters_dropout", 2, 0)
        y, g = run(lambda *a: fused(*a, mode, "aten"), x, base, a_s, b_s, scalings, ex, dy)
        assert y.shape == (2, 0, d) and g["dx"].shape == (2, 0, d)
        for key, a in zip("qkvo", a_s):
            assert torch.equal(g[f"A_{key}"], torch.zeros_like(a)), key


def test_attn_lora_non_contiguous_x_and_upstream_gradient():
    """x and dy with batch-minor strides give the contiguous results exactly, in every mode."""
    base, a_s, b_s, scalings, x, dy, ex = make_case("gqa_all_adapters_dropout", 2, 6)
    strided = lambda t: t.transpose(0, 1).contiguous().transpose(0, 1)  # noqa: E731  same values
    assert not strided(dy).is_contiguous()
    for mode in ("all", "qkv", "none"):
        fn = lambda *a: fused(*a, mode, "aten")  # noqa: E731
        y, want = run(fn, x, base, a_s, b_s, scalings, ex, dy)
        xs = strided(x).requires_grad_()
        aa = [a.clone().requires_grad_() if a is not None else None for a in a_s]
        bb = [b.clone().requires_grad_() if b is not None else None for b in b_s]
        got_y = fn(xs, base, aa, bb, scalings, ex)
        got_y.backward(strided(dy))
        got = {"dx": xs.grad, **{f"{k}_{r}": t.grad for ts, k in ((aa, "A"), (bb, "B"))
                                 for r, t in zip("qkvo", ts) if t is not None}}
        assert torch.equal(got_y.detach(), y) and set(got) == set(want)
        for n in want:
            assert torch.equal(got[n], want[n]), (mode, n)


def test_attn_lora_only_needed_gradients():
    """x without grad (the first layer's input): the adapters still get exact gradients; with only
    the o adapter trainable, the attention backward is not run at all."""
    base, a_s, b_s, scalings, x, dy, ex = make_case("qknorm_head_q_o", 1, 5)
    _, want = run(lambda *a: fused(*a, "qkv", "aten"), x, base, a_s, b_s, scalings, ex, dy)
    a_s = [a.clone().requires_grad_() if a is not None else None for a in a_s]
    b_s = [b.clone().requires_grad_() if b is not None else None for b in b_s]
    fused(x, base, a_s, b_s, scalings, ex, "qkv", "aten").backward(dy)
    for key in "qo":
        i = "qkvo".index(key)
        assert torch.equal(a_s[i].grad, want[f"A_{key}"]) and torch.equal(b_s[i].grad, want[f"B_{key}"]), key


def _see_through():
    """The LoRA ops' Python implementations run under the outer modes, so an outer
    FlopCounterMode counts the GEMMs they really do."""
    return SeeThrough({torch.ops.fused_ckpt.attn_lora_forward.default: ops.attn_lora_forward_impl,
                       torch.ops.fused_ckpt.attn_lora_backward.default: ops.attn_lora_backward_impl})


@pytest.mark.parametrize("case,mode", [("gqa_all_adapters_dropout", "all"), ("neox_partial", "qkv"),
                                       ("qknorm_head_q_o", "none")])
def test_attn_lora_flop_formulas_count_the_gemms(case, mode):
    """The registered FLOP formulas equal the GEMMs the implementation runs (non-causal: the CPU
    flash kernels' own formulas count dense attention), forward and backward, with every input
    trainable and with only the A factors."""
    base, a_s, b_s, scalings, x, dy, ex = make_case(case, 1, 6)
    ex["kpm"] = None
    kw = _op_kwargs(ex)
    kw.update(q_norm=base["q_norm"], k_norm=base["k_norm"])
    wq = base["wq"].t() if ex["conv1d"] else base["wq"]
    for needs_x in (True, False):
        counts = []
        for see in (False, True):
            xs = x.clone().requires_grad_(needs_x)
            aa = [a.clone().requires_grad_() if a is not None else None for a in a_s]
            bb = [b.clone().requires_grad_(needs_x) if b is not None else None for b in b_s]  # dB: some runs
            with FlopCounterMode(display=False) as fc:
                with _see_through() if see else contextlib.nullcontext():
                    y = attn_lora_forward(xs, wq, base["bq"], base["wk"], base["bk"], base["wv"], base["bv"],
                                          base["wo"], base["bo"], *aa, *bb, scalings, ex["pos"], None, ex["H"],
                                          ex["Hkv"], False, D ** -0.5, ex["theta"], mode, "aten", **kw)[0]
                    y.backward(dy)
            counts.append(fc.get_total_flops())
        assert counts[0] == counts[1] > 0, (case, mode, needs_x, counts)


def test_attn_lora_opcheck():
    base, a_s, b_s, scalings, x, dy, ex = make_case("neox_partial", 1, 5)
    kw = _op_kwargs(ex)
    args = (x, base["wq"], base["bq"], None, None, None, None, base["wo"], base["bo"], *a_s, *b_s, scalings,
            ex["pos"], ex["kpm"], ex["H"], ex["Hkv"], True, 0.2, 1e4)
    for mode in ("all", "none"):  # the two output structures ("qkv" is "none"'s minus q, k, v)
        torch.library.opcheck(attn_lora_forward, args + (mode, "aten"), kw)
    y, o, lse, q, k, v, *ts = attn_lora_forward(*args, "none", "aten", **kw)
    torch.library.opcheck(attn_lora_backward, (dy, x, base["wq"], base["bq"], None, None, None, None, base["wo"], q,
                                               k, v, o, lse, *ts, *a_s, *b_s, scalings, ex["pos"], ex["kpm"], ex["H"],
                                               ex["Hkv"], True, 0.2, 1e4, [True] * 9, "aten"), kw)


# ----------------------------------------------------------------------------- the functional
def _functional_args(case="gqa_all_adapters_dropout"):
    base, a_s, b_s, scalings, x, dy, ex = make_case(case, 2, 6)
    lora = {key: (a, b, s) for key, a, b, s in zip("qkvo", a_s, b_s, scalings) if a is not None}
    args = (x, base["wq"], base["bq"], base["wk"], base["bk"], base["wv"], base["bv"], base["wo"], base["bo"],
            ex["H"], ex["Hkv"])
    return args, lora, ex, dy


def test_functional_lora_matches_the_op_and_replays_its_dropout():
    """fused_attention_block(lora=...) draws the LoRA dropout seed from torch's generator: the
    same manual seed gives the same output and gradients, and they equal the op's with the seed
    the functional drew (taken from the generator the same way)."""
    from fused_ckpt.ops.attention import draw_dropout_seed

    args, lora, ex, dy = _functional_args()
    outs = []
    for _ in range(2):
        torch.manual_seed(7)
        x = args[0].clone().requires_grad_()
        y = fused_attention_block(x, *args[1:], rope_theta=1e4, position_ids=ex["pos"], key_padding_mask=ex["kpm"],
                                  recompute="all", backend="aten", lora=lora, lora_dropout=0.25)
        y.backward(dy)
        outs.append((y.detach(), x.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    torch.manual_seed(7)
    seed, offset = draw_dropout_seed()
    a_s = [lora[k][0] if k in lora else None for k in "qkvo"]
    b_s = [lora[k][1] if k in lora else None for k in "qkvo"]
    want = attn_lora_forward(*args[:9], *a_s, *b_s, [lora[k][2] for k in "qkvo"], ex["pos"], ex["kpm"], ex["H"],
                             ex["Hkv"], True, D ** -0.5, 1e4, "all", "aten", lora_dropout_p=0.25, lora_seed=seed,
                             lora_offset=offset)[0]
    assert torch.equal(outs[0][0], want)
    no_drop = fused_attention_block(*args, rope_theta=1e4, position_ids=ex["pos"], key_padding_mask=ex["kpm"],
                                    backend="aten", lora=lora)
    assert not torch.equal(no_drop, want)  # the dropout did drop something


def test_functional_lora_empty_dict_is_the_block():
    args, _, ex, _ = _functional_args()
    kw = dict(rope_theta=1e4, position_ids=ex["pos"], backend="aten")
    assert torch.equal(fused_attention_block(*args, lora={}, **kw), fused_attention_block(*args, **kw))


def test_functional_lora_bad_inputs():
    args, lora, ex, _ = _functional_args()
    call = dict(rope_theta=1e4, backend="aten")
    a, b, s = lora["q"]
    with pytest.raises(ValueError, match=r"lora has keys \['qkv'\] not among \('q', 'k', 'v', 'o'\)"):
        fused_attention_block(*args, lora={"qkv": (a, b, s)}, **call)
    with pytest.raises(ValueError, match=r"key 'qkv'"):
        packed = torch.randn(3 * 2 * D, d)
        fused_attention_block(args[0], packed, None, None, None, None, None, torch.randn(d, 2 * D), None, 2, 2,
                              qkv_layout="packed", lora={"q": (a, b, s)}, **call)
    with pytest.raises(ValueError, match=r"lora\['k'\]: A \(4, 64\) and B \(128, 4\) must be \[r, 64\] and \[64, r\]"):
        fused_attention_block(*args, lora={"k": (a, b, s)}, **call)
    with pytest.raises(TypeError, match=r"lora\['q'\]: A and B must share one dtype"):
        fused_attention_block(*args, lora={"q": (a.double(), b.double(), s)}, **call)
    with pytest.raises(ValueError, match=r"lora\['q'\] must be \(A, B, scaling\)"):
        fused_attention_block(*args, lora={"q": (a, b)}, **call)
    with pytest.raises(ValueError, match=r"lora\['q'\]: scaling must be a finite number"):
        fused_attention_block(*args, lora={"q": (a, b, math.inf)}, **call)
    with pytest.raises(ValueError, match=r"lora_dropout must be a number in \[0, 1\), got 1.0"):
        fused_attention_block(*args, lora=lora, lora_dropout=1.0, **call)
    with pytest.raises(TypeError, match="lora must be a dict"):
        fused_attention_block(*args, lora=[a, b], **call)
    trainable = list(args)
    trainable[7] = args[7].clone().requires_grad_()
    with pytest.raises(ValueError, match="must be frozen.*wo require grad"):
        fused_attention_block(*trainable, lora=lora, **call)


def test_op_refuses_a_trainable_base_in_backward():
    base, a_s, b_s, scalings, x, dy, ex = make_case("qknorm_head_q_o", 1, 4)
    base["wq"].requires_grad_()
    y = fused(x, base, a_s, b_s, scalings, ex, "qkv", "aten")
    with pytest.raises(RuntimeError, match="base weights must be frozen.*wq require grad"):
        y.backward(dy)
