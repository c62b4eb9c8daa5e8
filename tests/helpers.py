"""Shared test helpers: the tolerance rule; saved-tensor accounting comes from the package."""
from __future__ import annotations

import contextlib

import torch

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
