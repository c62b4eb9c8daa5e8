"""The flash attention backward launcher (fused_ckpt.kernels.flash_attn_bwd): the single-pass
backward (dQ by fp32 atomics inside the dK/dV kernel) against a float64 reference by
FlashAttention's 2x rule, its agreement with the deterministic two-kernel path, and the
dispatch between them (torch.use_deterministic_algorithms selects the deterministic one)."""
from __future__ import annotations

import contextlib
import math

import pytest
import torch

from .conftest import DEVICE, INTERPRET, TRITON_OK
from .helpers import assert_close_by_rule

pytestmark = pytest.mark.triton  # conftest: on CUDA tensors with a GPU, skipped without GPU or interpreter
DEV = DEVICE

if TRITON_OK:
    import fused_ckpt.kernels.flash_attn_bwd as bwd
    from fused_ckpt.kernels.flash_attn_fwd import flash_attn_fwd


# --------------------------------------------------------------------------- helpers
def _keep(S_q, S_kv, causal, kpm, device):
    """[B or 1, 1, S_q, S_kv] visibility: bottom-right causal, key padding."""
    keep = torch.ones(S_q, S_kv, dtype=torch.bool, device=device)
    if causal:
        keep = torch.arange(S_kv, device=device)[None, :] <= torch.arange(S_q, device=device)[:, None] + S_kv - S_q
    keep = keep[None, None]
    if kpm is not None:
        keep = keep & kpm[:, None, None, :]
    return keep


def math_attention(q, k, v, causal, scale, kpm):
    """PyTorch math attention in the inputs' dtype (softmax in fp32, rounded); rows without a
    visible key give 0. float64 inputs: the reference."""
    H, H_kv = q.shape[2], k.shape[2]
    k = k.repeat_interleave(H // H_kv, 2)
    v = v.repeat_interleave(H // H_kv, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = s.masked_fill(~_keep(q.shape[1], k.shape[1], causal, kpm, q.device), float("-inf"))
    soft = torch.float64 if q.dtype == torch.float64 else torch.float32
    p = torch.softmax(s, -1, dtype=soft).nan_to_num(0.0).to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", p, v)


def _inputs(B, S_q, S_kv, H, H_kv, D, dtype):
    return (torch.randn(B, S_q, H, D, device=DEV, dtype=dtype),
            torch.randn(B, S_kv, H_kv, D, device=DEV, dtype=dtype),
            torch.randn(B, S_kv, H_kv, D, device=DEV, dtype=dtype))


@contextlib.contextmanager
def deterministic_mode():
    """torch.use_deterministic_algorithms(True) for the block, the previous setting restored
    after. warn_only: on CUDA, cuBLAS ops would otherwise raise without CUBLAS_WORKSPACE_CONFIG."""
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)


class _Launches:
    """Wraps a launcher's kernel (``kernel[grid](...)``) and records each launch's kwargs."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.calls.append(kwargs)
            return launch(*args, **kwargs)

        return run


@pytest.fixture
def launches(monkeypatch):
    """Counts launches of the dK/dV and the dQ kernels by the launcher."""
    rec = {"dkdv": _Launches(bwd._flash_bwd_dkdv_kernel), "dq": _Launches(bwd._flash_bwd_dq_kernel)}
    monkeypatch.setattr(bwd, "_flash_bwd_dkdv_kernel", rec["dkdv"])
    monkeypatch.setattr(bwd, "_flash_bwd_dq_kernel", rec["dq"])
    yield {n: r.calls for n, r in rec.items()}


@pytest.fixture(autouse=True)
def _deterministic_mode_restored():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    assert torch.are_deterministic_algorithms_enabled() == before, "a test left deterministic mode changed"


def _forward(q, k, v, kpm, causal, scale):
    return flash_attn_fwd(q, k, v, kpm, causal, scale)


def _backward(do, q, k, v, o, lse, kpm, causal, scale, need_dq=True, need_dkdv=True):
    return bwd.flash_attn_bwd(do, q, k, v, o, lse, kpm, causal, scale, need_dq, need_dkdv)


def _check_against_reference(q, k, v, causal, kpm, scale, do=None):
    """Single-pass (dq, dk, dv) against float64 autograd by the 2x rule; rows that see no key
    and padded keys get exactly zero gradients."""
    o, lse = _forward(q, k, v, kpm, causal, scale)
    do = torch.randn_like(o) if do is None else do
    assert bwd.single_pass(True, True)
    grads = _backward(do, q, k, v, o, lse, kpm, causal, scale)

    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = math_attention(*ref_leaves, causal, scale, kpm)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.double())
    pt_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    pt = math_attention(*pt_leaves, causal, scale, kpm)
    pt_grads = torch.autograd.grad(pt, pt_leaves, do)

    for name, g, r, p, t in zip(("dq", "dk", "dv"), grads, ref_grads, pt_grads, (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype and g.is_contiguous(), name
        assert_close_by_rule(g, r, p, name)
    keep = _keep(q.shape[1], k.shape[1], causal, kpm, q.device)  # [B or 1, 1, S_q, S_kv]
    dead_q = ~keep.any(-1)[:, 0]  # [B or 1, S_q]: queries that see no key
    dead_k = ~keep.any(-2)[:, 0]  # [B or 1, S_kv]: keys no query sees
    dq, dk, dv = grads
    assert (dq[dead_q.expand(q.shape[0], -1)] == 0).all()
    assert (dk[dead_k.expand(k.shape[0], -1)] == 0).all() and (dv[dead_k.expand(k.shape[0], -1)] == 0).all()
    return grads


# --------------------------------------------------------------------------- single pass vs reference
# (B, S_q, S_kv, H, H_kv, D, causal, key padding, dtype)
CASES = {
    "fp32-mha": (2, 17, 17, 2, 2, 32, False, None, torch.float32),
    "bf16-gqa-causal-fewer-queries": (1, 20, 45, 4, 2, 32, True, None, torch.bfloat16),
    "bf16-causal-more-queries": (1, 45, 20, 2, 1, 64, True, None, torch.bfloat16),  # 25 queries see no key
    "fp16-mqa-padded": (2, 33, 40, 4, 1, 32, False, "random", torch.float16),
    "fp32-causal-padded-masked-batch": (3, 37, 45, 2, 1, 32, True, "masked", torch.float32),
    "bf16-q1-gqa": (2, 1, 17, 4, 1, 32, True, "random", torch.bfloat16),
    "fp32-d128": (1, 9, 37, 2, 2, 128, True, None, torch.float32),
    "bf16-d256": (1, 5, 33, 1, 1, 256, False, None, torch.bfloat16),
}


def _kpm(kind, B, S_kv):
    if kind is None:
        return None
    kpm = torch.rand(B, S_kv, device=DEV) > 0.3
    if kind == "masked":
        kpm[0, 20:] = False  # right padding
        kpm[1, :] = False  # every key padded: the whole batch row sees nothing
        kpm[2, :] = False  # three keys (causal: queries before key 13 + S_q - S_kv see none)
        kpm[2, [13, 22, 40]] = True
    return kpm


@pytest.mark.parametrize("case", list(CASES))
def test_single_pass_matches_reference(case, launches):
    B, S_q, S_kv, H, H_kv, D, causal, padding, dtype = CASES[case]
    q, k, v = _inputs(B, S_q, S_kv, H, H_kv, D, dtype)
    _check_against_reference(q, k, v, causal, _kpm(padding, B, S_kv), scale=1.0 / math.sqrt(D))
    assert [c["ATOMIC_DQ"] for c in launches["dkdv"]] == [True] and launches["dq"] == []


def flash_backward_math(do, q, k, v, o, lse, causal, scale, kpm):
    """FlashAttention-2's backward formulas in PyTorch, in the inputs' dtype (float64: the
    reference), given the forward's o and lse: P = exp(scale * Q K^T - lse), delta =
    rowsum(dO * O), dS = P * (dO V^T - delta); returns (dq, dk, dv)."""
    G = q.shape[2] // k.shape[2]
    kr, vr = k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    keep = _keep(q.shape[1], k.shape[1], causal, kpm, q.device)
    p = torch.exp(s - lse[..., None]).masked_fill(~keep, 0.0)
    delta = (do * o).sum(-1).transpose(1, 2)[..., None]
    ds = p * (torch.einsum("bqhd,bkhd->bhqk", do, vr) - delta)
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, kr) * scale
    dk = (torch.einsum("bhqk,bqhd->bkhd", ds, q) * scale).unflatten(2, (-1, G)).sum(3)
    dv = torch.einsum("bhqk,bqhd->bkhd", p, do).unflatten(2, (-1, G)).sum(3)
    return dq, dk, dv


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # exp2 before the mask
def test_single_pass_very_negative_scores(launches):
    """Every score about -130 (LSE < -88): exp(s - LSE) of the zero-padded keys past S_kv
    would overflow to inf in the ragged last key block; those keys must be masked, or inf
    times their zero K rows turns dQ into NaN.

    The bound is the 2x rule for the backward given the forward's o and lse: float64 and
    PyTorch fp32 evaluations of FlashAttention-2's formulas (``flash_backward_math``) from
    the same o, lse. The end-to-end bound of the other cases (PyTorch autograd through an
    fp32 softmax) does not apply to dq here: scores near -130 carry fp32 rounding of
    ~1e-5, and keys sharing a large common part (-2 in every coordinate, spread 0.1) turn
    any mismatch between delta = rowsum(dO * O) and the recomputed P into a dq error
    ~20x dq's own precision. Autograd's dS sums exactly to zero over its own P, so its error
    stays small by construction; any FlashAttention-2 backward (and PyTorch's fp32
    evaluation of the same formulas) has the mismatch. Measured (ATen default and AVX2
    paths): the kernel's dq error 4.9e-5 to 8.0e-5, fp32 autograd's 4.5e-6 to 5.5e-6, the
    fp32 formulas' 6.2e-5; over ten seeds the kernel stayed within 1.6x the fp32 formulas."""
    q, k, v = _inputs(1, 64, 45, 4, 1, 32, torch.float32)  # 256 query rows: a stable max error
    q = 2.0 + 0.1 * q
    k = -2.0 + 0.1 * k
    o, lse = _forward(q, k, v, None, False, 1.0)
    assert lse.max().item() < -88.0  # exp(0 - lse) overflows in fp32: the masking matters
    do = torch.randn_like(o)
    grads = _backward(do, q, k, v, o, lse, None, False, 1.0)
    assert [c["ATOMIC_DQ"] for c in launches["dkdv"]] == [True] and launches["dq"] == []
    ref = flash_backward_math(*(t.double() for t in (do, q, k, v, o, lse)), False, 1.0, None)
    pt = flash_backward_math(do, q, k, v, o, lse, False, 1.0, None)
    for name, g, r, p in zip(("dq", "dk", "dv"), grads, ref, pt):
        assert_close_by_rule(g, r, p, name)


def test_single_pass_non_contiguous_inputs():
    """q, k, v as views of a packed projection, dO transposed: any strides."""
    B, S, H, D = 2, 21, 2, 32
    qkv = torch.randn(B, S, 3, H, D, device=DEV)
    q, k, v = qkv.unbind(2)
    do = torch.randn(B, H, S, D, device=DEV).transpose(1, 2)
    assert not (q.is_contiguous() or do.is_contiguous())
    grads = _check_against_reference(q, k, v, True, None, 0.2, do=do)
    contiguous = _check_against_reference(q.contiguous(), k.contiguous(), v.contiguous(), True, None, 0.2,
                                          do=do.contiguous())
    for a, b in zip(grads, contiguous):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("S_q,S_kv", [(0, 5), (4, 0)])
def test_empty_sequences(S_q, S_kv, launches):
    q, k, v = _inputs(1, S_q, S_kv, 2, 1, 32, torch.bfloat16)
    o, lse = _forward(q, k, v, None, False, 0.2)
    dq, dk, dv = _backward(torch.randn_like(o), q, k, v, o, lse, None, False, 0.2)
    for g, t in zip((dq, dk, dv), (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype and (g == 0).all()
    assert launches["dkdv"] == [] and launches["dq"] == []


# --------------------------------------------------------------------------- the two paths
def _both_paths(B, S_q, S_kv, H, H_kv, D, causal, dtype, kpm=None, scale=0.25):
    q, k, v = _inputs(B, S_q, S_kv, H, H_kv, D, dtype)
    o, lse = _forward(q, k, v, kpm, causal, scale)
    do = torch.randn_like(o)
    single = _backward(do, q, k, v, o, lse, kpm, causal, scale)
    with deterministic_mode():
        det = _backward(do, q, k, v, o, lse, kpm, causal, scale)
    return single, det, (do, q, k, v, o, lse, kpm, causal, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_paths_agree(dtype, causal, launches):
    """dQ differs only by summation order (and its final rounding): within a unit or two of
    the dtype's precision at dQ's scale. dK and dV come from the same loop in both paths:
    bitwise equal under the interpreter (on GPU the autotuner may tile them differently)."""
    kpm = torch.rand(2, 41, device=DEV) > 0.2
    single, det, _ = _both_paths(2, 30, 41, 4, 2, 32, causal, dtype, kpm)
    assert [c["ATOMIC_DQ"] for c in launches["dkdv"]] == [True, False] and len(launches["dq"]) == 1
    eps = torch.finfo(dtype).eps
    for name, a, b in zip(("dq", "dk", "dv"), single, det):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape, name
        if INTERPRET and name != "dq":
            assert torch.equal(a, b), name
        scale = b.abs().max().item()
        tol = (64 if dtype == torch.float32 else 2) * eps * scale
        assert (a.double() - b.double()).abs().max().item() <= tol, name


def test_deterministic_mode_is_bitwise_reproducible(launches):
    """Under torch.use_deterministic_algorithms(True) the launcher takes the two-kernel path
    (no atomics) and two calls give bitwise-identical gradients."""
    q, k, v = _inputs(2, 40, 40, 4, 1, 32, torch.bfloat16)
    o, lse = _forward(q, k, v, None, True, 0.2)
    do = torch.randn_like(o)
    with deterministic_mode():
        assert not bwd.single_pass(True, True)
        first = _backward(do, q, k, v, o, lse, None, True, 0.2)
        again = _backward(do, q, k, v, o, lse, None, True, 0.2)
    assert [c["ATOMIC_DQ"] for c in launches["dkdv"]] == [False, False] and len(launches["dq"]) == 2
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("need_dq,need_dkdv", [(True, False), (False, True)])
def test_partial_gradients_use_the_separate_kernels(need_dq, need_dkdv, launches):
    """Only dQ or only dK/dV: the kernel that computes it, as before (no atomics)."""
    single, _, args = _both_paths(1, 19, 23, 2, 1, 32, True, torch.float32)
    launches["dkdv"].clear()
    launches["dq"].clear()
    assert not bwd.single_pass(need_dq, need_dkdv)
    dq, dk, dv = _backward(*args, need_dq=need_dq, need_dkdv=need_dkdv)
    assert (dq is not None) == need_dq and (dk is not None) == (dv is not None) == need_dkdv
    assert len(launches["dq"]) == int(need_dq)
    assert [c["ATOMIC_DQ"] for c in launches["dkdv"]] == [False] * int(need_dkdv)
    for got, ref in zip((dq, dk, dv), single):
        if got is not None:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_dispatch_rule():
    assert bwd.single_pass(True, True)
    assert not bwd.single_pass(True, False) and not bwd.single_pass(False, True)
    with deterministic_mode():
        assert not bwd.single_pass(True, True)
    assert bwd.single_pass(True, True)


# --------------------------------------------------------------------------- autotuning and builds
def test_autotune_resets_the_dq_accumulator():
    """Benchmarking a config launches the kernel, whose atomics add into dQ: the pre-hook
    zeroes the accumulator before every launch, only in the single pass."""
    kernel = bwd._flash_bwd_dkdv_kernel
    assert "ATOMIC_DQ" in kernel.keys  # the two paths are tuned separately
    acc = torch.ones(3)
    kernel.pre_hook({"ATOMIC_DQ": False, "dq_ptr": acc})
    assert (acc == 1).all()  # the deterministic path's dq_ptr is a dummy: left alone
    kernel.pre_hook({"ATOMIC_DQ": True, "dq_ptr": acc}, reset_only=True)
    assert (acc == 0).all()


def test_single_pass_configs_and_aot_specs(monkeypatch):
    """The GPU configs left for the single pass are a subset of the deterministic path's and
    never empty; tools/aot_compile.py builds the single pass at head_dim 64 and 128."""
    monkeypatch.setattr(bwd, "INTERPRET", False)
    configs = bwd.dkdv_configs()
    assert len(configs) > 1

    class Elem:
        def __init__(self, size):
            self.size = size

        def element_size(self):
            return self.size

    for elem in (2, 4):
        for hd in (32, 64, 128, 256):
            named = {"q_ptr": Elem(elem)}
            det = bwd._prune_dkdv(configs, named, HEAD_DIM=hd, ATOMIC_DQ=False)
            single = bwd._prune_dkdv(configs, named, HEAD_DIM=hd, ATOMIC_DQ=True)
            assert single and set(single) <= set(det), (elem, hd)
            if elem == 2:  # within the register estimate that builds without spills
                assert all(bwd._atomic_dq_regs(c, hd, elem) <= bwd.ATOMIC_DQ_REGS for c in single), hd
    specs = [(consts["HEAD_DIM"], consts.get("ATOMIC_DQ")) for kernel, _, consts, _ in bwd.aot_specs()
             if kernel is bwd._flash_bwd_dkdv_kernel]
    assert {(64, True), (128, True), (64, False), (128, False)} <= set(specs)


def test_autotune_off_keeps_the_first_survivor(monkeypatch):
    """FUSED_CKPT_AUTOTUNE=0 (the GPU tests of gpu_check.sh): each pruner returns one config,
    the first that its own rules keep."""
    from fused_ckpt.kernels import _common
    from fused_ckpt.kernels import flash_attn_fwd as fwd

    monkeypatch.setattr(bwd, "INTERPRET", False)
    configs = bwd.dkdv_configs()

    class Elem:
        def element_size(self):
            return 2

    named = {"q_ptr": Elem()}
    tuned = {(hd, atomic): bwd._prune_dkdv(configs, named, HEAD_DIM=hd, ATOMIC_DQ=atomic)
             for hd in (64, 128) for atomic in (False, True)}
    fwd_tuned = fwd.prune_by_head_dim(128 * 128)(configs, named, HEAD_DIM=128)
    assert any(len(v) > 1 for v in tuned.values()) and len(fwd_tuned) > 1
    monkeypatch.setattr(_common, "AUTOTUNE", False)
    for (hd, atomic), kept in tuned.items():
        assert bwd._prune_dkdv(configs, named, HEAD_DIM=hd, ATOMIC_DQ=atomic) == kept[:1], (hd, atomic)
    assert fwd.prune_by_head_dim(128 * 128)(configs, named, HEAD_DIM=128) == fwd_tuned[:1]
