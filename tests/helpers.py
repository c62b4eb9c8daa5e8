"""Shared test helpers: the tolerance rule; saved-tensor accounting comes from the package."""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fused_ckpt.accounting import SavedTensors, unique_saved_bytes  # noqa: F401


def dtype_eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def assert_close_by_rule(got: torch.Tensor, ref64: torch.Tensor, pt_same_dtype: torch.Tensor,
                         name: str, factor: float = 2.0) -> None:
    """FlashAttention's rule: |got - ref64|_max <= factor * |pt - ref64|_max + eps, where ``pt``
    is PyTorch's own computation in the same dtype and ``ref64`` the float64 reference. eps is
    one unit of the dtype's precision at the reference's scale (so an exactly-rounded result
    always passes). A non-vacuity check follows: the reference is non-zero and the result is
    within 10% of its scale (a zero or garbage tensor fails)."""
    assert got.shape == ref64.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    err = (got.double() - ref64).abs().max().item() if got.numel() else 0.0
    pt_err = (pt_same_dtype.double() - ref64).abs().max().item() if got.numel() else 0.0
    eps = dtype_eps(got.dtype) * scale
    assert err <= factor * pt_err + eps, (
        f"{name}: max error {err:.3e} > {factor} x PyTorch {got.dtype} error {pt_err:.3e} + eps {eps:.1e}"
    )
    if got.numel():
        assert scale > 0, f"{name}: reference is all zeros (vacuous test)"
        assert err <= 0.1 * scale, f"{name}: error {err:.3e} is not small against scale {scale:.3e}"


def assert_close_by_rule_over_batches(gots: list, refs64: list, pts: list, name: str, factor: float = 2.0) -> None:
    """The 2x rule for end-to-end comparisons of tiny fp32 models, with the error measured as the
    L2 norm over several batches instead of the max over one:
    ``||got - ref64||_2 <= factor * ||pt - ref64||_2 + eps * ||ref64||_2`` over the stacked batches
    (``gots``, ``refs64``, ``pts``: one tensor per batch). Why: in such a model a gradient is a small
    tensor (64 norm weights, a bias) and two equally accurate fp32 computations of it differ in
    error from batch to batch. Measured over 16 batches x 8 Hugging Face families x 2 SIMD paths
    (3104 tensors; tests/test_hf_families.py's models): the fused path's L2 error is PyTorch's
    (median ratio 0.99), but single-batch max-error ratios spread to 3.3, so the max rule fails 0.5%
    of tensors on noise alone, with the SIMD path deciding which; the L2 norm over 4 batches stayed
    within 1.25x everywhere. The same non-vacuity checks as :func:`assert_close_by_rule` follow."""
    assert len(gots) == len(refs64) == len(pts) > 0, name
    for g, r in zip(gots, refs64):
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
    got = torch.cat([g.double().flatten() for g in gots])
    ref = torch.cat([r.flatten() for r in refs64])
    pt = torch.cat([p.double().flatten() for p in pts])
    if not got.numel():
        return
    err, pt_err = (got - ref).norm().item(), (pt - ref).norm().item()
    eps = dtype_eps(gots[0].dtype) * ref.norm().item()
    assert err <= factor * pt_err + eps, (
        f"{name}: L2 error over {len(gots)} batches {err:.3e} > {factor} x PyTorch {gots[0].dtype} error "
        f"{pt_err:.3e} + eps {eps:.1e}")
    scale = ref.abs().max().item()
    assert scale > 0, f"{name}: reference is all zeros (vacuous test)"
    worst = (got - ref).abs().max().item()
    assert worst <= 0.1 * scale, f"{name}: error {worst:.3e} is not small against scale {scale:.3e}"


@contextlib.contextmanager
def deterministic():
    """PyTorch's deterministic mode (``warn_only``: cuBLAS would otherwise demand
    CUBLAS_WORKSPACE_CONFIG), restored afterwards. The Triton attention backward then runs its
    two-kernel path instead of the single pass with fp32 atomics for dQ."""
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)


class OpLog(TorchDispatchMode):
    """Names of the ops dispatched inside (custom ops included): ``with OpLog() as names``."""

    def __enter__(self):
        self.names = []
        super().__enter__()
        return self.names

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


class SeeThrough(TorchDispatchMode):
    """Runs custom ops' Python implementations (``impls``: op overload -> function) under the
    outer modes, so a FlopCounterMode (or a recorder) entered before this one sees the aten ops
    they really run."""

    def __init__(self, impls: dict):
        super().__init__()
        self.impls = impls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.impls.get(func, func)(*args, **(kwargs or {}))
