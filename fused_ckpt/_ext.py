"""The compiled extension ``fused_ckpt._C`` (csrc/) and Python wrappers for its ops.

Nothing here runs when ``fused_ckpt`` is imported: the shared object is imported on the first
``load()`` (directly or through a wrapper), and no device is queried.  Loading registers

=================================  ==========================================================
op                                 meaning
=================================  ==========================================================
``fused_ckpt_ext::act_forward``    ``h = act(z)``; z [M, F1] -> h [M, f]
``fused_ckpt_ext::act_backward``   ``dz = vjp of act at z with cotangent dh``, plus h if asked
=================================  ==========================================================

with CPU kernels (always) and CUDA kernels (when the build found CUDA torch and nvcc), and
fake (meta) implementations so ``torch.compile`` and ``torch.library.opcheck`` can trace them.
F1 = f for ungated activations, 2f = [gate | up] for gated ones (see ``activations.py``).
"""
from __future__ import annotations

import importlib
import threading
from types import ModuleType

import torch

from .activations import get_activation

_BUILD_HINT = (
    "build it from the repository root with `pip install -e . --no-build-isolation` "
    "(or `make install`); rebuild after changing torch"
)

_lock = threading.Lock()
_module: ModuleType | None = None
_fwd_op = None
_bwd_op = None


def available() -> bool:
    """Whether the compiled extension can be loaded (loads it if so)."""
    try:
        load()
    except RuntimeError:
        return False
    return True


def load() -> ModuleType:
    """Import ``fused_ckpt._C`` once, registering its ops and their fake implementations."""
    global _module, _fwd_op, _bwd_op
    if _module is not None:
        return _module
    with _lock:
        if _module is None:
            try:
                mod = importlib.import_module("fused_ckpt._C")
            except ImportError as e:
                raise RuntimeError(
                    f"fused_ckpt's compiled extension fused_ckpt._C could not be imported ({e}); {_BUILD_HINT}"
                ) from e
            _register_fakes()
            _fwd_op = torch.ops.fused_ckpt_ext.act_forward.default
            _bwd_op = torch.ops.fused_ckpt_ext.act_backward.default
            _module = mod
    return _module


def has_cuda_kernels() -> bool:
    """Whether the loaded extension was built with its CUDA kernels."""
    return bool(load().WITH_CUDA)


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda" and not has_cuda_kernels():
        raise RuntimeError(
            "fused_ckpt._C was built without CUDA kernels (torch without CUDA, nvcc/CUDA_HOME not "
            "found, or FUSED_CKPT_NO_CUDA=1), but got CUDA tensors; on a machine with CUDA torch and "
            f"nvcc, {_BUILD_HINT}"
        )


def act_forward(z: torch.Tensor, activation: str) -> torch.Tensor:
    """Activation forward: z [M, F1] -> h [M, f] in z's dtype (math in fp32).

    Equivalent PyTorch::

        h = fused_ckpt.activations.get_activation(activation).hidden(z)
    """
    load()
    _check_device(z)
    return _fwd_op(z, activation)


def act_backward(
    z: torch.Tensor, dh: torch.Tensor, activation: str, need_h: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Activation backward from the pre-activation z [M, F1] and dh [M, f].

    Returns ``(dz, h)``: dz has z's shape and dtype; h is the recomputed forward output
    (what the down-projection's weight gradient needs) when ``need_h``, else None.

    Equivalent PyTorch::

        act = fused_ckpt.activations.get_activation(activation)
        z = z.detach().requires_grad_()
        h = act.hidden(z)
        (dz,) = torch.autograd.grad(h, z, dh)
        return dz, (h.detach() if need_h else None)
    """
    load()
    _check_device(z)
    dz, h = _bwd_op(z, dh, activation, bool(need_h))
    return dz, (h if need_h else None)


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes and dtypes only, with the same validation as csrc.


def _fake_checks(z: torch.Tensor, activation: str) -> tuple[bool, object, object]:
    act = get_activation(activation)  # ValueError naming the supported activations
    if z.dim() != 2:
        raise RuntimeError(f"fused_ckpt_ext: z must be 2-D [M, F1], got shape {tuple(z.shape)}")
    if z.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise RuntimeError(f"fused_ckpt_ext: z has unsupported dtype {z.dtype}")
    M, F1 = z.shape
    if act.gated:
        torch._check(F1 % 2 == 0, lambda: f"fused_ckpt_ext: gated activation {activation!r} needs an even "
                                          f"last dimension, got z of shape {tuple(z.shape)}")
        return True, M, F1 // 2
    return False, M, F1


def _register_fakes() -> None:
    @torch.library.register_fake("fused_ckpt_ext::act_forward")
    def _act_forward_fake(z, activation):
        _, M, f = _fake_checks(z, activation)
        return z.new_empty((M, f))

    @torch.library.register_fake("fused_ckpt_ext::act_backward")
    def _act_backward_fake(z, dh, activation, need_h):
        _, M, f = _fake_checks(z, activation)
        torch._check(dh.dim() == 2 and dh.shape[0] == M and dh.shape[1] == f,
                     lambda: f"fused_ckpt_ext: dh must have shape [{M}, {f}], got {tuple(dh.shape)}")
        if dh.dtype != z.dtype:
            raise RuntimeError(f"fused_ckpt_ext: dh dtype {dh.dtype} does not match z dtype {z.dtype}")
        dz = z.new_empty(z.shape)  # contiguous, like the real kernels' output
        h = z.new_empty((M, f)) if need_h else z.new_empty((0,))
        return dz, h
