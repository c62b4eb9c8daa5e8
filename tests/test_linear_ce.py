"""Fused LM head + cross-entropy: numerics against float64 (every option, both recompute modes,
both backends), the recompute contract (saved bytes, no [tokens, V] tensor), FLOPs, custom-op
registration, the module, and clear errors for bad input. Shapes are tiny: the Triton kernels
run under the interpreter here."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from fused_ckpt import FusedLinearCrossEntropy, fused_linear_cross_entropy
from fused_ckpt.ops import linear_ce as lce_ops

from .conftest import DEVICE
from .helpers import SavedTensors, assert_close_by_rule

IGNORE = -100
OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "softcap": {"softcap": 3.0},
    "z_loss": {"z_loss": 1e-2},
    "all": {"label_smoothing": 0.2, "softcap": 4.0, "z_loss": 5e-2},
}


def _data(tokens_shape, d, V, dtype, bias=True, ignore=(1,), seed=0):
    """Drawn on CPU from a seeded generator, then moved to the default device (the GPU for
    Triton tests on a CUDA machine, see conftest)."""
    g = torch.Generator().manual_seed(seed)
    dev = torch.get_default_device()
    x = torch.randn(*tokens_shape, d, generator=g, device="cpu")
    w = torch.randn(V, d, generator=g, device="cpu") * 0.5  # logits of a few units: a real softmax
    b = torch.randn(V, generator=g, device="cpu") if bias else None
    t = torch.randint(0, V, tokens_shape, generator=g, device="cpu")
    flat = t.view(-1)
    for i in ignore:
        if i < flat.numel():
            flat[i] = IGNORE
    x, w, t = x.to(dev, dtype), w.to(dev, dtype), t.to(dev)
    return x, w, (b.to(dev, dtype) if bias else None), t


def _reference(x, w, b, t, dtype, *, reduction="mean", label_smoothing=0.0, softcap=None, z_loss=0.0,
               num_items=None):
    """Eager PyTorch in ``dtype``: logits GEMM, softcap, log-softmax cross-entropy, z-loss."""
    leaves = [p.detach().to(dtype).requires_grad_() if p is not None else None for p in (x, w, b)]
    xr, wr, br = leaves
    z = F.linear(xr, wr, br)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    z2, tt = z.reshape(-1, w.shape[0]), t.reshape(-1)
    per = F.cross_entropy(z2, tt, ignore_index=IGNORE, label_smoothing=label_smoothing, reduction="none")
    if z_loss:
        per = per + z_loss * z2.logsumexp(-1) ** 2 * (tt != IGNORE)
    per = per.reshape(t.shape)
    if reduction == "none":
        loss = per
    elif reduction == "sum":
        loss = per.sum() / (num_items if num_items is not None else 1)
    else:
        loss = per.sum() / (tt != IGNORE).sum()
    return loss, per, leaves


def check(x, w, b, t, *, backend, recompute=True, factor=2.0, **opts):
    """Loss and every gradient against float64 by the 2x-PyTorch-error rule; returns the loss."""
    leaves = [p.detach().clone().requires_grad_() if p is not None else None for p in (x, w, b)]
    loss = fused_linear_cross_entropy(leaves[0], leaves[1], t, leaves[2], backend=backend,
                                      recompute=recompute, **opts)
    assert loss.dtype == torch.float32
    g = torch.randn(loss.shape)
    loss.backward(g)
    ref = {}
    ref_opts = {k: v for k, v in opts.items() if k not in ("chunk_tokens", "chunk_vocab")}
    for dt in (torch.float64, x.dtype):
        rl, _, rleaves = _reference(x, w, b, t, dt, **ref_opts)
        rl.backward(g.to(dt))
        ref[dt] = (rl.detach(), [p.grad if p is not None else None for p in rleaves])
    assert_close_by_rule(loss, ref[torch.float64][0], ref[x.dtype][0], "loss", factor)
    for name, p, r64, rpt in zip(("dx", "dw", "db"), leaves, ref[torch.float64][1], ref[x.dtype][1]):
        if p is not None:
            assert_close_by_rule(p.grad, r64, rpt, name, factor)
    return loss


# ----------------------------------------------------------------------------- numerics
# recompute=False needs a scalar loss (reduction="none" with it is refused: test_bad_input)
@pytest.mark.parametrize("reduction,recompute", [("mean", True), ("sum", True), ("none", True),
                                                 ("mean", False), ("sum", False)],
                         ids=["mean-recompute", "sum-recompute", "none-recompute", "mean-grads_in_fwd",
                              "sum-grads_in_fwd"])
@pytest.mark.parametrize("opt", sorted(OPTIONS))
def test_aten_options_match_float64(opt, reduction, recompute):
    x, w, b, t = _data((3, 5), 24, 37, torch.float32, ignore=(1, 7))
    check(x, w, b, t, backend="aten", recompute=recompute, reduction=reduction, **OPTIONS[opt])


@pytest.mark.triton
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "grads_in_fwd"])
@pytest.mark.parametrize("opt", ["plain", "all"])
def test_triton_options_match_float64(opt, recompute):
    x, w, b, t = _data((2, 7), 24, 101, torch.float32, ignore=(1, 7))
    check(x, w, b, t, backend="triton", recompute=recompute, **OPTIONS[opt])


@pytest.mark.parametrize("backend", ["triton", "aten"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_match_float64(dtype, backend):
    x, w, b, t = _data((11,), 24, 37, dtype, ignore=(4,))
    check(x, w, b, t, backend=backend, reduction="none", **OPTIONS["all"])


@pytest.mark.parametrize("backend", ["triton", "aten"])
def test_reduction_none_softcap_single_vocab_split(backend):
    """29 classes: one vocabulary split in the Triton stats kernel (no partials to merge)."""
    x, w, b, t = _data((9,), 24, 29, torch.float32, bias=False, ignore=(0, 8))
    check(x, w, b, t, backend=backend, reduction="none", softcap=2.0)


@pytest.mark.parametrize("backend,recompute", [("aten", True), ("aten", False), ("triton", True)])
def test_chunked_with_all_ignored_chunk(backend, recompute):
    """4-token x 16-class chunks over 12 tokens and 37 classes: several token and vocabulary
    chunks (fp32 dX and dW accumulators, tails in both directions), tokens 4..7 (one whole chunk)
    ignored. Per-token losses with random per-token upstream gradients where the mode allows it
    (each chunk's rows weighted differently), the summed loss otherwise."""
    x, w, b, t = _data((12,), 24, 37, torch.float32, ignore=(2, 4, 5, 6, 7))
    check(x, w, b, t, backend=backend, recompute=recompute, chunk_tokens=4, chunk_vocab=16,
          reduction="none" if recompute else "sum", **OPTIONS["all"])


def test_large_odd_vocab_aten():
    """GPT-2's vocabulary (50257: a multiple of no tile) in vocabulary chunks of 4096."""
    x, w, b, t = _data((6,), 8, 50257, torch.float32, bias=False, ignore=(3,))
    check(x, w, b, t, backend="aten", chunk_vocab=4096, label_smoothing=0.1)


@pytest.mark.parametrize("backend", ["triton", "aten"])
def test_num_items(backend):
    x, w, b, t = _data((8,), 24, 37, torch.float32, ignore=(0, 1))
    check(x, w, b, t, backend=backend, reduction="sum", num_items=13)
    # a tensor (Hugging Face's num_items_in_batch) divides the same way, in both recompute modes
    for recompute in (True, False):
        xs = x.clone().requires_grad_()
        got = fused_linear_cross_entropy(xs, w, t, b, reduction="sum", num_items=torch.tensor(13),
                                         backend=backend, recompute=recompute)
        got.backward()
        ref, _, (xr, _, _) = _reference(x, w, b, t, torch.float64, reduction="sum", num_items=13)
        ref.backward()
        torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(xs.grad.double(), xr.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "aten"])
@pytest.mark.parametrize("tokens", [0, 1])
def test_zero_and_one_token(tokens, backend):
    x, w, b, t = _data((tokens,), 24, 37, torch.float32, ignore=())
    if tokens:
        check(x, w, b, t, backend=backend, **OPTIONS["all"])
        return
    x.requires_grad_()
    w.requires_grad_()
    mean = fused_linear_cross_entropy(x, w, t, b, backend=backend)
    assert torch.isnan(mean)  # like F.cross_entropy on no tokens
    total = fused_linear_cross_entropy(x, w, t, b, reduction="sum", backend=backend)
    total.backward()
    assert total.item() == 0.0 and x.grad.shape == (0, 24)
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", ["triton", "aten"])
def test_all_ignored_is_nan_with_zero_grads_like_pytorch(backend):
    x, w, b, t = _data((5,), 24, 37, torch.float32, ignore=range(5))
    x.requires_grad_()
    w.requires_grad_()
    loss = fused_linear_cross_entropy(x, w, t, b, backend=backend, label_smoothing=0.1, z_loss=0.1)
    loss.backward()
    assert torch.isnan(loss)
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", ["triton", "aten"])
def test_autocast_bf16(backend):
    """Under autocast the head runs in bf16 (x, W, b cast), the loss in fp32; gradients land
    in the fp32 leaves. Compared by the rule with eager autocast PyTorch."""
    x, w, b, t = _data((7,), 24, 37, torch.float32, ignore=(2,))
    leaves = [p.clone().requires_grad_() for p in (x, w, b)]
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(*leaves[:2], t, leaves[2], backend=backend, z_loss=0.1)
    loss.backward()
    cast = [p.to(torch.bfloat16).double() for p in (x, w, b)]
    r64, _, l64 = _reference(*cast[:2], cast[2], t, torch.float64, z_loss=0.1)
    r64.backward()
    lpt = [p.clone().requires_grad_() for p in (x, w, b)]
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        logits = F.linear(lpt[0], lpt[1], lpt[2])
        rpt = F.cross_entropy(logits.float(), t, ignore_index=IGNORE, reduction="none")
        rpt = (rpt + 0.1 * logits.float().logsumexp(-1) ** 2 * (t != IGNORE)).sum() / (t != IGNORE).sum()
    rpt.backward()
    assert_close_by_rule(loss, r64.detach(), rpt.detach(), "loss")
    for name, p, r, q in zip(("dx", "dw", "db"), leaves, l64, lpt):
        assert p.grad.dtype == torch.float32
        assert_close_by_rule(p.grad, r.grad, q.grad, name)


@pytest.mark.parametrize("backend", ["triton", "aten"])
def test_non_contiguous_inputs(backend):
    x, w, b, t = _data((9,), 24, 37, torch.float32)
    xs = x.t().contiguous().t()  # (9, 24) with strides (1, 9)
    ws = w.t().contiguous().t()
    assert not xs.is_contiguous() and not ws.is_contiguous()
    check(xs, ws, b, t, backend=backend, label_smoothing=0.1)


@pytest.mark.parametrize("recompute", [True, False])
def test_float64_on_aten_is_float64(recompute):
    """float64 runs on the aten backend in float64 (statistics, loss and accumulators too): it
    matches the float64 reference to float64 rounding; the Triton backend refuses it by name."""
    x, w, b, t = _data((6,), 24, 37, torch.float64, ignore=(2,))
    leaves = [p.clone().requires_grad_() for p in (x, w, b)]
    loss = fused_linear_cross_entropy(*leaves[:2], t, leaves[2], recompute=recompute, chunk_tokens=4,
                                      chunk_vocab=16, **OPTIONS["all"])  # auto picks aten
    loss.backward()
    ref, _, rl = _reference(x, w, b, t, torch.float64, **OPTIONS["all"])
    ref.backward()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
    for p, r in zip(leaves, rl):
        assert p.grad.dtype == torch.float64
        torch.testing.assert_close(p.grad, r.grad, rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="backend='triton' does not support .*float64"):
        fused_linear_cross_entropy(x.to(DEVICE), w.to(DEVICE), t.to(DEVICE), backend="triton")


def test_return_details_and_pytorch_mean_definition():
    x, w, b, t = _data((10,), 24, 37, torch.float32, ignore=(3,))
    out = fused_linear_cross_entropy(x, w, t, b, backend="aten", label_smoothing=0.1, z_loss=0.1,
                                     return_details=True)
    _, per64, _ = _reference(x, w, b, t, torch.float64, label_smoothing=0.1, z_loss=0.1)
    torch.testing.assert_close(out.per_token_loss.double(), per64.detach(), rtol=1e-5, atol=1e-5)
    lse = F.linear(x.double(), w.double(), b.double()).logsumexp(-1)
    valid = t != IGNORE
    torch.testing.assert_close(out.z_loss.double(), (0.1 * lse[valid] ** 2).mean(), rtol=1e-5, atol=1e-6)
    assert not out.per_token_loss.requires_grad and out.z_loss.item() > 0
    # without z-loss the mean is exactly F.cross_entropy's own mean with smoothing and ignore_index
    plain = fused_linear_cross_entropy(x, w, t, b, backend="aten", label_smoothing=0.1)
    pt = F.cross_entropy(F.linear(x.double(), w.double(), b.double()), t, ignore_index=IGNORE,
                         label_smoothing=0.1)
    torch.testing.assert_close(plain.double(), pt, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- recompute contract
@pytest.mark.parametrize("backend", ["triton", "aten"])
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.int32], ids=str)
def test_saved_bytes_recompute_is_x_lse_targets(target_dtype, backend):
    m = FusedLinearCrossEntropy(24, 37, bias=True, backend=backend, dtype=torch.bfloat16)
    x = torch.randn(2, 5, 24, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 37, (2, 5), dtype=target_dtype)
    with SavedTensors() as s:
        loss = m(x, t)
    assert s.total_bytes(m.parameters()) == x.numel() * 2 + 10 * 4 + t.numel() * t.element_size()
    assert s.total_bytes(m.parameters()) == m.saved_bytes(10, target_dtype=target_dtype)
    assert any(v is x for v in s.saved) and any(v is t for v in s.saved)  # kept, not copied
    loss.backward()  # the graph is usable


@pytest.mark.parametrize("backend", ["triton", "aten"])
def test_saved_bytes_grads_in_forward_are_the_gradients(backend):
    m = FusedLinearCrossEntropy(24, 37, bias=False, recompute=False, backend=backend)
    x = torch.randn(10, 24, requires_grad=True)
    with SavedTensors() as s:
        loss = m(x, torch.randint(0, 37, (10,)))
    assert s.total_bytes(m.parameters()) == (10 * 24 + 37 * 24) * 4 == m.saved_bytes(10)
    loss.backward()


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_nothing_saved_without_grad(ctx):
    m = FusedLinearCrossEntropy(16, 37, recompute=False, backend="aten")
    with SavedTensors() as s, ctx():
        m(torch.randn(5, 16, requires_grad=True), torch.randint(0, 37, (5,)))
    assert s.saved == []


class _SeeThroughCustomOps(TorchDispatchMode):
    """Runs the linear-CE custom ops' Python implementations, so outer modes see their aten ops."""

    IMPLS = {
        torch.ops.fused_ckpt.linear_ce_forward.default: lce_ops.linear_ce_forward_impl,
        torch.ops.fused_ckpt.linear_ce_backward.default: lce_ops.linear_ce_backward_impl,
    }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        impl = self.IMPLS.get(func)
        return (impl or func)(*args, **(kwargs or {}))


class _Largest(TorchDispatchMode):
    """Records the bytes of every tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor):
                self.numels.append(o.numel() * o.element_size())
        return out


@pytest.mark.parametrize("backend", ["triton", "aten"])
@pytest.mark.parametrize("recompute", [True, False])
def test_no_tokens_by_vocab_tensor(recompute, backend):
    """40 tokens, 101 classes, chunks of 16 x 64: no tensor created while the op runs, forward or
    backward, has the bytes of a [T, V] tensor in the narrowest float type (2 bytes an element).
    Counted in bytes because the Triton interpreter copies kernel arguments as byte tensors; the
    largest tensors are [V, d] ones (dW, its fp32 accumulator and those copies, 101*16*4 bytes)."""
    T, d, V = 40, 16, 101
    x, w, b, t = _data((T,), d, V, torch.float32, ignore=(3,))
    x.requires_grad_()
    w.requires_grad_()
    kw = dict(backend=backend, recompute=recompute, chunk_tokens=16, chunk_vocab=64, label_smoothing=0.1)
    if x.is_cuda:  # autotune first: its benchmarking allocates a cache-flush buffer
        fused_linear_cross_entropy(x, w, t, b, **kw).backward()
    rec = _Largest()
    with rec, _SeeThroughCustomOps():
        fused_linear_cross_entropy(x, w, t, b, **kw).backward()
    assert rec.numels and max(rec.numels) < T * V * 2, max(rec.numels)
    assert max(rec.numels) >= V * d * 4  # the dW buffers were seen: the mode recorded the implementation


# ----------------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("recompute,frozen_w,units", [(True, False, 4), (False, False, 3), (True, True, 3),
                                                      (False, True, 2)])
def test_flop_formula_matches_counted_gemms(recompute, frozen_w, units):
    """logits, logits again in backward (recompute=True only), dX, dW; a frozen head (LoRA,
    tied frozen embeddings) skips the dW GEMM."""
    T, d, V = 16, 24, 37
    x, w, b, t = _data((T,), d, V, torch.float32)

    def flops(see_through):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_(not frozen_w)
        counter = FlopCounterMode(display=False)
        with counter:
            if see_through:
                with _SeeThroughCustomOps():
                    fused_linear_cross_entropy(xs, ws, t, b, backend="aten", recompute=recompute).backward()
            else:
                fused_linear_cross_entropy(xs, ws, t, b, backend="aten", recompute=recompute).backward()
        return counter.get_total_flops()

    assert flops(True) == flops(False) == units * 2 * T * d * V
    m = FusedLinearCrossEntropy(d, V, recompute=recompute)
    assert m.recompute_flops(T) == (2 * T * d * V if recompute else 0)  # what the planner will read


def test_double_backward_raises():
    x, w, b, t = _data((5,), 16, 37, torch.float32)
    x.requires_grad_()
    loss = fused_linear_cross_entropy(x, w, t, b, backend="aten")
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        gx.sum().backward()


# ----------------------------------------------------------------------------- custom ops, compile
@pytest.mark.parametrize("save", [0, 1])
def test_opcheck(save):
    """Schemas, fake implementations and autograd registration (backend-independent: aten, the
    fast one under the interpreter)."""
    backend = "aten"
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    t = torch.tensor([1, IGNORE, 9])
    torch.library.opcheck(torch.ops.fused_ckpt.linear_ce_forward.default,
                          (x, w, b, t, IGNORE, 0.1, 3.0, 0.01, 2, 1.0, save, [True, True, True], 0, 0, backend))
    if save == 0:
        lse = torch.randn(3)
        torch.library.opcheck(torch.ops.fused_ckpt.linear_ce_backward.default,
                              (torch.tensor(1.5), torch.randn(3), x.detach(), w.detach(), b.detach(), t, lse,
                               IGNORE, 0.1, 3.0, 0.01, 2, 1.0, [True, True, False], 0, 0, backend))


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    head = nn.Linear(16, 37, bias=False)
    proj = nn.Linear(16, 16)
    loss_mod = FusedLinearCrossEntropy.from_linear(head, backend="aten", z_loss=0.01)
    x = torch.randn(2, 6, 16)
    t = torch.randint(0, 37, (2, 6))
    t[0, 2] = IGNORE

    def step(x, t):
        return loss_mod(proj(x), t)

    def run(fn):
        for p in (head.weight, *proj.parameters()):
            p.grad = None
        loss = fn(x, t)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in (head.weight, *proj.parameters())]

    eager = run(step)
    # aot_eager: dynamo (fullgraph: no graph break) and AOTAutograd tracing through the fake
    # implementations, without inductor's C++ compile, which takes half a minute on 2 cores
    compiled = run(torch.compile(step, fullgraph=True, backend="aot_eager"))
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- module
def test_from_linear_shares_tied_embedding():
    """A head tied to the input embedding: the loss module reads the same Parameter, and the
    tied weight's gradient sums both uses, as with the unfused model."""
    V, d = 37, 16
    emb = nn.Embedding(V, d)
    head = nn.Linear(d, V, bias=False)
    head.weight = emb.weight
    loss_mod = FusedLinearCrossEntropy.from_linear(head, backend="aten", label_smoothing=0.1)
    assert loss_mod.weight is emb.weight and loss_mod.bias is None
    assert list(loss_mod.state_dict()) == ["weight"]
    ids = torch.randint(0, V, (2, 5))
    t = torch.randint(0, V, (2, 5))
    loss_mod(torch.tanh(emb(ids)), t).backward()
    fused_grad = emb.weight.grad.clone()
    emb.weight.grad = None
    ref = F.cross_entropy(head(torch.tanh(emb(ids))).reshape(-1, V), t.reshape(-1), label_smoothing=0.1)
    ref.backward()
    torch.testing.assert_close(fused_grad, emb.weight.grad, rtol=1e-5, atol=1e-6)


def test_module_matches_linear_plus_cross_entropy_and_loads_state_dict():
    head = nn.Linear(16, 37)
    m = FusedLinearCrossEntropy(16, 37, bias=True, backend="aten", reduction="sum")
    m.load_state_dict(head.state_dict())
    x, t = torch.randn(4, 16), torch.randint(0, 37, (4,))
    torch.testing.assert_close(m(x, t), F.cross_entropy(head(x), t, reduction="sum"), rtol=1e-5, atol=1e-5)
    assert "recompute=True" in repr(m)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.triton
def test_bad_input():
    x, w, b, t = _data((4,), 16, 37, torch.float32, ignore=())
    f = fused_linear_cross_entropy
    bad_t = t.clone()
    bad_t[2] = 37
    with pytest.raises(ValueError, match=r"target 37 \(flattened position 2\) is out of range .*37 classes"):
        f(x, w, bad_t, b, backend="aten")
    bad_t[2] = -1
    with pytest.raises(ValueError, match=r"target -1 .*not ignore_index=-100"):
        f(x, w, bad_t, b, backend="aten")
    with pytest.raises(ValueError, match=r"last dimension of x is 15 .*d_model=16"):
        f(x[:, :15], w, t, b)
    with pytest.raises(ValueError, match=r"target has shape \(3,\) but x \(4, 16\)"):
        f(x, w, t[:3], b)
    with pytest.raises(ValueError, match=r"bias has shape \(36,\), expected \(37,\)"):
        f(x, w, t, b[:36])
    with pytest.raises(TypeError, match="target must hold class indices.*torch.float32"):
        f(x, w, t.float(), b)
    with pytest.raises(TypeError, match=r"x torch.float16, weight torch.float32"):
        f(x.half(), w, t, b)
    with pytest.raises(TypeError, match="x must be .*float32.*torch.int64"):
        f(x.long(), w.long(), t)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        f(x, w[0], t)
    with pytest.raises(ValueError, match="recompute=False .* reduction='mean' or 'sum'"):
        f(x, w.requires_grad_(), t, reduction="none", recompute=False)
    with pytest.raises(ValueError, match="num_items .* needs reduction='sum'"):
        f(x, w, t, num_items=3)
    with pytest.raises(ValueError, match="num_items must be positive"):
        f(x, w, t, reduction="sum", num_items=0)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        f(x, w, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="softcap must be None or a positive"):
        f(x, w, t, softcap=-1.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        f(x, w, t, reduction="avg")
    with pytest.raises(ValueError, match="one device.*x on meta"):
        f(x.to("meta"), w, t)
    with pytest.raises(ValueError, match="cannot|from_linear expects an nn.Linear"):
        FusedLinearCrossEntropy.from_linear(nn.Embedding(3, 4))


def test_chunk_sizes():
    # one token chunk for a usual LM batch; vocabulary chunks of whole 128-tiles under the budget
    c, vc = lce_ops.chunk_sizes(8192, 151936)
    assert c == 8192 and vc % lce_ops.CHUNK_ROUND == 0 and c * vc * 4 <= lce_ops.CHUNK_TEMP_BYTES
    assert lce_ops.chunk_sizes(5, 37) == (5, 37)
    assert lce_ops.chunk_sizes(10**6, 50257)[0] == 50176
