"""flash_attention's options: logit softcap, sliding window and attention-probability dropout
(replayed from a Philox seed), on the Triton kernels (interpreter on CPU) and the aten path,
against float64 references with the same mask, by FlashAttention's 2x rule."""
from __future__ import annotations

import math

import pytest
import torch

from fused_ckpt.functional_attention import flash_attention
from fused_ckpt.ops.attention import (AtenAttention, AttnOptions, dropout_keep_mask, flash_attn_backward,
                                      flash_attn_forward)

from .conftest import DEVICE
from .helpers import SavedTensors, assert_close_by_rule, deterministic

DEV = DEVICE
BACKENDS = [pytest.param("triton", marks=pytest.mark.triton), "aten"]


def reference_attention(q, k, v, causal=False, scale=None, kpm=None, softcap=None, window=None,
                        keep=None, dropout_p=0.0):
    """Attention in the inputs' dtype as Hugging Face's eager Gemma 2 code computes it (softmax
    in fp32, rounded); ``keep`` [B, H, S_q, S_kv]: a dropout keep mask scaled by 1/(1-p).
    float64 inputs: the reference."""
    B, S_q, H, D = q.shape
    S_kv, H_kv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    k = k.repeat_interleave(H // H_kv, 2)
    v = v.repeat_interleave(H // H_kv, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    qi = torch.arange(S_q, device=q.device)[:, None] + S_kv - S_q
    kj = torch.arange(S_kv, device=q.device)[None, :]
    vis = torch.ones(S_q, S_kv, dtype=torch.bool, device=q.device)
    if causal:
        vis = kj <= qi
    if window is not None:
        vis = vis & (kj > qi - window)
    vis = vis[None, None]
    if kpm is not None:
        vis = vis & kpm[:, None, None, :]
    s = s.masked_fill(~vis, float("-inf"))
    soft = torch.float64 if q.dtype == torch.float64 else torch.float32
    p = torch.softmax(s, -1, dtype=soft).nan_to_num(0.0).to(q.dtype)
    if keep is not None:
        p = p * keep.to(q.dtype) / (1 - dropout_p)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def _inputs(B, S_q, S_kv, H, H_kv, D, dtype, std=1.0):
    return tuple(torch.randn(*shape, device=DEV, dtype=dtype) * std
                 for shape in ((B, S_q, H, D), (B, S_kv, H_kv, D), (B, S_kv, H_kv, D)))


def _check(q, k, v, backend, causal=False, kpm=None, scale=None, softcap=None, window=None, dropout_p=0.0,
           seed=0, rng_offset=0):
    """Forward and dq, dk, dv of the op (the options passed straight, so the dropout seed is
    known) against float64 autograd of :func:`reference_attention` with the same mask."""
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, _ = flash_attn_forward(*leaves, kpm, causal, scale, backend, softcap, window, dropout_p, seed, rng_offset)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    keep = None
    if dropout_p > 0:
        B, S_q, H, _ = q.shape
        keep = dropout_keep_mask(seed, rng_offset, dropout_p, B, H, torch.arange(S_q, device=q.device),
                                 torch.arange(k.shape[1], device=q.device))
    kw = dict(causal=causal, scale=scale, kpm=kpm, softcap=softcap, window=window, keep=keep, dropout_p=dropout_p)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*ref_leaves, **kw)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    pt_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    pt = reference_attention(*pt_leaves, **kw)
    pt_grads = torch.autograd.grad(pt, pt_leaves, dout)
    assert_close_by_rule(out, ref, pt, "out")
    for name, g, r, p in zip(("dq", "dk", "dv"), grads, ref_grads, pt_grads):
        assert_close_by_rule(g, r, p, name)
    return out, grads


# (B, S_q, S_kv, H, H_kv, D, causal, dtype): several key blocks of the interpreter's 32x32
# tiles, ragged tails, GQA, S_q != S_kv both ways.
SOFTCAP_CASES = [
    (1, 40, 40, 2, 1, 32, True, torch.float32),
    (1, 33, 70, 4, 2, 64, False, torch.bfloat16),
    (1, 70, 45, 2, 2, 32, True, torch.float16),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,S_q,S_kv,H,H_kv,D,causal,dtype", SOFTCAP_CASES)
def test_softcap(B, S_q, S_kv, H, H_kv, D, causal, dtype, backend):
    """Scores of std ~3 against a cap of 5: tanh is well into its non-linear range."""
    q, k, v = _inputs(B, S_q, S_kv, H, H_kv, D, dtype, std=2.0)
    _check(q, k, v, backend, causal=causal, softcap=5.0)


def test_softcap_changes_the_result():
    q, k, v = _inputs(1, 20, 20, 2, 2, 32, torch.float32, std=2.0)
    a = flash_attention(q, k, v, causal=True, backend="aten")
    b = flash_attention(q, k, v, causal=True, softcap=5.0, backend="aten")
    assert (a - b).abs().max() > 1e-2


# (S_q, S_kv, window, key padding): windows smaller than, equal to and larger than a 32-key
# tile, one that spans the whole sequence, S_q < S_kv (bottom-right alignment), padding.
WINDOW_CASES = [
    (100, 100, 5, False),
    (100, 100, 32, False),
    (90, 90, 45, True),
    (40, 97, 20, False),
    (70, 70, 200, False),
    (1, 50, 7, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("S_q,S_kv,window,padded", WINDOW_CASES)
def test_sliding_window(S_q, S_kv, window, padded, backend, monkeypatch):
    """aten: the math path here (the fused CPU kernels' own fp32 error is up to ~3x eager's,
    window or not; they are held to the math path below, as in test_flash_attention)."""
    import fused_ckpt.ops.attention as ops

    monkeypatch.setattr(ops, "_use_cpu_flash", lambda q, k: False)
    q, k, v = _inputs(2 if padded else 1, S_q, S_kv, 2, 1, 32, torch.float32)
    kpm = None
    if padded:
        kpm = torch.rand(2, S_kv, device=DEV) > 0.3
        kpm[1, : S_kv // 2] = False  # left padding: with a small window some queries see no key
    _check(q, k, v, backend, causal=True, kpm=kpm, window=window)


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_and_softcap_bf16_gqa(backend):
    q, k, v = _inputs(1, 80, 80, 4, 1, 64, torch.bfloat16, std=2.0)
    _check(q, k, v, backend, causal=True, softcap=8.0, window=24)


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_rows_without_keys_are_zero(backend):
    """A key padding mask that leaves a query's window empty: output, lse and gradients 0 there."""
    q, k, v = (t.requires_grad_() for t in _inputs(1, 40, 40, 2, 2, 32, torch.float32))
    kpm = torch.ones(1, 40, dtype=torch.bool, device=DEV)
    kpm[0, 10:30] = False  # queries 10..29 with window 4 see keys (i-4, i]: all padded for i in 13..29
    out = flash_attention(q, k, v, causal=True, window=4, key_padding_mask=kpm, backend=backend)
    dead = slice(13, 30)
    assert (out[:, dead] == 0).all() and (out[:, :10] != 0).any() and (out[:, 33:] != 0).any()
    out.backward(torch.randn_like(out))
    assert torch.isfinite(q.grad).all() and (q.grad[:, dead] == 0).all()
    _, lse = flash_attn_forward(q.detach(), k.detach(), v.detach(), kpm, True, 0.2, backend, None, 4)
    assert (lse[..., dead] == float("-inf")).all() and torch.isfinite(lse[..., :13]).all()


@pytest.mark.triton
def test_window_deterministic_two_kernel_backward():
    """The dQ kernel's window stages (taken under deterministic mode) agree with the reference."""
    q, k, v = _inputs(1, 75, 75, 2, 1, 32, torch.float32)
    with deterministic():
        _check(q, k, v, "triton", causal=True, window=17, softcap=10.0)


@pytest.mark.triton
def test_triton_and_aten_agree_with_window_softcap():
    q, k, v = _inputs(1, 64, 64, 2, 2, 32, torch.float32)
    a = flash_attention(q, k, v, causal=True, window=10, softcap=3.0, backend="triton")
    b = flash_attention(q, k, v, causal=True, window=10, softcap=3.0, backend="aten")
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_window_on_the_fused_cpu_path(dtype, monkeypatch):
    """A window alone keeps the aten backend's forward on PyTorch's fused CPU kernel (the window as an
    additive mask; keys 20..24 padded, so queries 22..24 see no key): o, dq, dk, dv within 2x
    of the math path's error against float64, rows without keys exactly 0."""
    import fused_ckpt.ops.attention as ops
    from tests.test_flash_attention import CPU_FLASH_FWD, CPU_FLASH_OPS, _AtenOps

    if not ops._CPU_FLASH_TORCH:
        pytest.skip("the fused CPU path needs torch >= 2.9")
    q, k, v = (t.cpu() for t in _inputs(2, 50, 50, 2, 1, 32, dtype))
    kpm = torch.ones(2, 50, dtype=torch.bool)
    kpm[1, 20:25] = False
    do = torch.randn_like(q)
    opts = AttnOptions(window=3)
    with _AtenOps() as seen:
        fused = AtenAttention.forward(q, k, v, kpm, True, 0.2, opts)
        fused = (fused[0], *AtenAttention.backward(do, q, k, v, *fused, kpm, True, 0.2, True, True, opts))
    assert CPU_FLASH_OPS & seen.names == CPU_FLASH_FWD
    monkeypatch.setattr(ops, "_use_cpu_flash", lambda q, k: False)
    math_ = AtenAttention.forward(q, k, v, kpm, True, 0.2, opts)
    math_ = (math_[0], *AtenAttention.backward(do, q, k, v, *math_, kpm, True, 0.2, True, True, opts))
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = reference_attention(*leaves, causal=True, scale=0.2, kpm=kpm, window=3)
    ref = (ref, *torch.autograd.grad(ref, leaves, do.double()))
    assert (fused[0][1, 22:25] == 0).all() and (fused[1][1, 22:25] == 0).all() and (fused[0][1, 21] != 0).all()
    for name, a, m, r in zip(("o", "dq", "dk", "dv"), fused, math_, ref):
        assert_close_by_rule(a, r, m, name)


# --------------------------------------------------------------------------- dropout
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,dtype", [(True, torch.float32), (False, torch.bfloat16)])
def test_dropout_matches_reference_with_same_mask(causal, dtype, backend):
    q, k, v = _inputs(2, 45, 45, 4, 2, 32, dtype)
    _check(q, k, v, backend, causal=causal, dropout_p=0.3, seed=1234567890123, rng_offset=77)


@pytest.mark.triton
def test_dropout_with_window_softcap_and_deterministic_backward():
    q, k, v = _inputs(1, 70, 70, 2, 1, 32, torch.float32, std=2.0)
    with deterministic():
        _check(q, k, v, "triton", causal=True, softcap=6.0, window=20, dropout_p=0.2, seed=99, rng_offset=3)


@pytest.mark.triton
def test_triton_and_aten_draw_the_same_mask():
    """The kernels' Philox bits equal the torch implementation's: with v = identity rows the
    output is the dropped, rescaled probability matrix itself."""
    S, D = 32, 32
    q = torch.zeros(1, S, 1, D, device=DEV)  # uniform probabilities 1/S over every key
    k = torch.randn(1, S, 1, D, device=DEV)
    v = torch.eye(S, D, device=DEV)[None, :, None, :]
    args = (None, False, 1.0)
    o_t, _ = flash_attn_forward(q, k, v, *args, "triton", None, None, 0.5, 2**40 + 12345, 6)
    o_a, _ = flash_attn_forward(q, k, v, *args, "aten", None, None, 0.5, 2**40 + 12345, 6)
    keep = dropout_keep_mask(2**40 + 12345, 6, 0.5, 1, 1, torch.arange(S), torch.arange(S))[0, 0]
    expected = keep.float() * (2.0 / S)
    assert torch.equal(o_t[0, :, 0].cpu() != 0, keep) and 0.3 < keep.float().mean() < 0.7
    torch.testing.assert_close(o_t[0, :, 0].cpu(), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(o_a[0, :, 0], expected, atol=1e-6, rtol=1e-6)


def test_dropout_mask_statistics():
    """The fraction kept is 1 - p within 5 standard deviations, per p, on 2^18 draws; masks of
    different seeds, offsets, heads and batches differ."""
    from fused_ckpt.kernels.flash_attn_fwd import dropout_threshold
    from fused_ckpt.ops.attention import philox_word0

    # the bits dropout_keep_mask thresholds, for (batch, head) pairs 0..3, 256 queries x 256 keys
    r = philox_word0(31337, torch.arange(256).view(1, 1, -1), torch.arange(256).view(1, -1, 1),
                     torch.arange(4).view(-1, 1, 1), torch.tensor(0)) >> 1
    assert torch.equal(r[1] >= dropout_threshold(0.5),
                       dropout_keep_mask(31337, 0, 0.5, 2, 2, torch.arange(256), torch.arange(256))[0, 1])
    for p in (0.1, 0.5, 0.9):
        keep = r >= dropout_threshold(p)
        n = keep.numel()
        assert abs(keep.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    a = dropout_keep_mask(1, 0, 0.5, 2, 2, torch.arange(64), torch.arange(64))
    b = dropout_keep_mask(2, 0, 0.5, 2, 2, torch.arange(64), torch.arange(64))
    c = dropout_keep_mask(1, 1, 0.5, 2, 2, torch.arange(64), torch.arange(64))
    assert (a != b).float().mean() > 0.4 and (a != c).float().mean() > 0.4
    assert (a[0, 0] != a[0, 1]).float().mean() > 0.4 and (a[0, 0] != a[1, 0]).float().mean() > 0.4


def test_philox_matches_the_published_test_vector():
    """Philox-4x32-10 known-answer test (Random123's kat_vectors: counter and key all 0xffffffff)."""
    from fused_ckpt.ops.attention import philox_word0

    ones = torch.tensor([0xFFFFFFFF], dtype=torch.int64)
    assert philox_word0(2**64 - 1, ones, ones, ones, ones).item() == 0x408F276D


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_is_reproducible_by_manual_seed(backend):
    q, k, v = _inputs(1, 40, 40, 2, 2, 32, torch.float32)

    def run(seed):
        torch.manual_seed(seed)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = flash_attention(*leaves, causal=True, dropout_p=0.25, backend=backend)
        return (out, *torch.autograd.grad(out, leaves, torch.ones_like(out)))

    with deterministic():
        a, b, c = run(0), run(0), run(1)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert (a[0] != c[0]).any()
    assert not torch.equal(a[0], flash_attention(q, k, v, causal=True, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_saves_no_mask(backend):
    q, k, v = (t.requires_grad_() for t in _inputs(1, 33, 33, 2, 2, 32, torch.float32))
    with SavedTensors() as st:
        out = flash_attention(q, k, v, causal=True, dropout_p=0.5, backend=backend)
    assert st.total_bytes([]) == 3 * q.numel() * 4 + out.numel() * 4 + 2 * 33 * 4  # q, k, v, o, lse


def test_bad_options():
    q, k, v = _inputs(1, 8, 8, 2, 2, 32, torch.float32)
    for kw, match in ((dict(softcap=0.0), "softcap"), (dict(softcap=float("inf")), "softcap"),
                      (dict(window=0, causal=True), "window"), (dict(window=2.5, causal=True), "window"),
                      (dict(window=4), "causal"), (dict(dropout_p=1.0), "dropout_p"),
                      (dict(dropout_p=-0.1), "dropout_p"), (dict(dropout_p=True), "dropout_p")):
        with pytest.raises(ValueError, match=match):
            flash_attention(q, k, v, backend="aten", **kw)


@pytest.mark.parametrize("backend", ["aten"])  # the schema and fakes do not depend on the backend
def test_opcheck_with_options(backend):
    q, k, v = (t.requires_grad_() for t in _inputs(1, 17, 17, 2, 1, 32, torch.float32))
    args = (q, k, v, None, True, 0.25, backend, 4.0, 5, 0.2, 123, 4)
    torch.library.opcheck(flash_attn_forward, args)
    o, lse = flash_attn_forward(q.detach(), k.detach(), v.detach(), *args[3:])
    torch.library.opcheck(flash_attn_backward, (torch.randn_like(o), q.detach(), k.detach(), v.detach(), o, lse,
                                                None, True, 0.25, [True, True, False], backend, 4.0, 5, 0.2, 123, 4))


def test_window_flop_formulas():
    """FlopCounterMode sees the visible (query, key) pairs of a sliding window (the kernels skip
    the tiles outside it): forward 4 * B * H * D * pairs, backward 2.5x, in the flash op and in
    the attention block."""
    from torch.utils.flop_counter import FlopCounterMode

    from fused_ckpt.functional_attention import fused_attention_block

    def count(fn):
        counter = FlopCounterMode(display=False)
        with counter:
            fn()
        return counter.get_total_flops()

    B, S_q, S_kv, H, D, W = 1, 12, 20, 2, 32, 5
    pairs = sum(len([j for j in range(S_kv) if i + 8 - W < j <= i + 8]) for i in range(S_q))
    q, k, v = (t.requires_grad_() for t in _inputs(B, S_q, S_kv, H, H, D, torch.float32))
    fwd = count(lambda: flash_attention(q, k, v, causal=True, window=W, backend="aten"))
    assert fwd == 4 * B * H * D * pairs
    total = count(lambda: flash_attention(q, k, v, causal=True, window=W, backend="aten").sum().backward())
    assert total == fwd + 5 * fwd // 2
    x = torch.randn(1, 16, 64, requires_grad=True)
    w = [torch.randn(64, 64, requires_grad=True) for _ in range(4)]
    blk = lambda **kw: fused_attention_block(x, w[0], None, w[1], None, w[2], None, w[3], None, 2,  # noqa: E731
                                             backend="aten", **kw)
    pairs_sq = sum(min(i + 1, 4) for i in range(16))
    assert count(blk) - count(lambda: blk(window=4)) == 4 * 2 * 32 * (16 * 16 // 2 - pairs_sq)


def test_option_pruning_drops_the_tiles_that_spilled(monkeypatch):
    """With softcap/dropout on, the sm_90 bf16 builds that spilled registers (triton 3.9, every
    option on) are not selected; without them the plain selection is unchanged."""
    from fused_ckpt.kernels import flash_attn_bwd as fb
    from fused_ckpt.kernels import flash_attn_fwd as ff

    class Elem:
        def element_size(self):
            return 2

    monkeypatch.setattr(ff, "INTERPRET", False)
    monkeypatch.setattr(fb, "INTERPRET", False)
    q = {"q_ptr": Elem()}
    base = dict(CAUSAL=True, HAS_KPM=False, DOT_F32=False, INPUT_PRECISION=None)
    on = dict(HAS_SOFTCAP=True, HAS_WINDOW=True, HAS_DROPOUT=True)
    tiles = lambda cfgs: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in cfgs}  # noqa: E731

    def fwd(D, **kw):
        return tiles(ff._flash_fwd_kernel.early_config_prune(ff.fwd_configs(), q, HEAD_DIM=D, **base, **kw))

    def dq(D, **kw):
        return tiles(fb._flash_bwd_dq_kernel.early_config_prune(fb.dq_configs(), q, HEAD_DIM=D, **base, **kw))

    def dkdv(D, atomic, **kw):
        return tiles(fb._flash_bwd_dkdv_kernel.early_config_prune(fb.dkdv_configs(), q, HEAD_DIM=D,
                                                                  ATOMIC_DQ=atomic, **base, **kw))

    for spilled, sel, D in (((128, 128, 8), fwd, 64), ((128, 32, 4), fwd, 128), ((64, 64, 4), dq, 128)):
        assert spilled in sel(D) and spilled not in sel(D, **on)
        assert sel(D, **on)  # something is always left
    assert (64, 32, 4) not in fwd(256, **on)
    for atomic in (False, True):
        assert (64, 128, 8) in dkdv(64, atomic) and (64, 128, 8) not in dkdv(64, atomic, **on)
    assert fwd(64, HAS_WINDOW=True) == fwd(64)  # a window alone adds no tile
