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

Where the extension comes from: the prebuilt ``fused_ckpt._C`` when the install compiled it
(``pip install -e . --no-build-isolation``, ``make install``).  When that module is missing
(plain ``pip install -e .`` under pip's build isolation has no torch to compile against) or
fails to import (built against another torch), ``load()`` compiles csrc/ with ninja against
the running torch, once, into a per-user cache (``build_dir()``; FUSED_CKPT_BUILD_DIR
overrides it), printing a line while it does; FUSED_CKPT_JIT_BUILD=0 turns that off.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import sys
import threading
import time
from types import ModuleType

import torch

from . import _build_flags
from .activations import get_activation

_BUILD_HINT = (
    "build it at install time from the repository root with `pip install -e . --no-build-isolation` "
    "(or `make install`), with torch installed first; rebuild after changing torch"
)
_TOOLS_HINT = (
    "compiling needs ninja (`pip install ninja`), a C++17 compiler (g++ or clang++, e.g. "
    "`apt-get install g++`) and the Python headers (e.g. `apt-get install python3-dev`)"
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
                mod = _build_on_first_use(f"fused_ckpt._C could not be imported: {e}")
            _register_fakes()
            _fwd_op = torch.ops.fused_ckpt_ext.act_forward.default
            _bwd_op = torch.ops.fused_ckpt_ext.act_backward.default
            _module = mod
    return _module


def csrc_dir() -> str | None:
    """The csrc sources: fused_ckpt/_csrc in an installed package, csrc/ in a checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    for d in (os.path.join(here, "_csrc"), os.path.join(os.path.dirname(here), "csrc")):
        if os.path.isfile(os.path.join(d, _build_flags.CPU_SOURCES[0])):
            return d
    return None


def build_dir() -> str:
    """Root of the first-use build cache: $FUSED_CKPT_BUILD_DIR, else
    $XDG_CACHE_HOME/fused_ckpt, else ~/.cache/fused_ckpt."""
    env = os.environ.get("FUSED_CKPT_BUILD_DIR")
    if env:
        return os.path.abspath(os.path.expanduser(env))
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fused_ckpt")


def _ninja_path_dirs() -> list[str]:
    """Directories to put on PATH so torch finds ninja: the interpreter's bin dir (a venv that
    was not activated) and the ``ninja`` wheel's own bin dir."""
    dirs = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the PyPI wheel

        dirs.append(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    return [d for d in dirs if os.path.isfile(os.path.join(d, "ninja"))]


def _build_on_first_use(why: str) -> ModuleType:
    """Compile csrc/ against the running torch with ``torch.utils.cpp_extension.load`` (ninja)
    into a cache directory keyed by the sources, flags, torch and Python versions."""
    if os.environ.get("FUSED_CKPT_JIT_BUILD", "1") == "0":
        raise RuntimeError(f"{why}; FUSED_CKPT_JIT_BUILD=0 forbids compiling it on first use; {_BUILD_HINT}")
    src = csrc_dir()
    if src is None:
        raise RuntimeError(f"{why}; the csrc sources to compile it from are not installed either "
                           f"(reinstall fused_ckpt from its repository); {_BUILD_HINT}")
    from torch.utils import cpp_extension

    with_cuda = _build_flags.want_cuda(torch.version.cuda, cpp_extension.CUDA_HOME)
    try:
        cxx = _build_flags.cxx_flags() + [f"-DFUSED_CKPT_WITH_CUDA={int(with_cuda)}"]
    except ValueError as e:
        raise RuntimeError(f"{why}; cannot compile it: {e}") from None
    nvcc = _build_flags.nvcc_flags() + [f"-DFUSED_CKPT_WITH_CUDA={int(with_cuda)}"] if with_cuda else None
    sources = [os.path.join(src, n) for n in _build_flags.CPU_SOURCES]
    if with_cuda:
        sources += [os.path.join(src, n) for n in _build_flags.CUDA_SOURCES]

    key = hashlib.sha256()
    for name in _build_flags.csrc_files(src):
        with open(os.path.join(src, name), "rb") as f:
            key.update(name.encode() + b"\0" + f.read() + b"\0")
    key.update(repr((cxx, nvcc, os.environ.get("TORCH_CUDA_ARCH_LIST"), torch.__version__,
                     sys.version_info[:2])).encode())
    tag = f"torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-{'cuda' if with_cuda else 'cpu'}"
    directory = os.path.join(build_dir(), f"{tag}-{key.hexdigest()[:16]}")
    os.makedirs(directory, exist_ok=True)

    cached = any(n.startswith("_C") and n.endswith((".so", ".pyd")) for n in os.listdir(directory))
    if not cached:
        print(f"fused_ckpt: {why}.\nfused_ckpt: compiling the csrc extension with ninja "
              f"({'CPU + CUDA' if with_cuda else 'CPU'} kernels, MAX_JOBS={os.environ.get('MAX_JOBS', '2')}) "
              f"into {directory}; once per torch version, 1-2 minutes on two cores (longer with "
              f"CUDA). To compile at install time instead: "
              f"`pip install -e . --no-build-isolation`.", file=sys.stderr, flush=True)
    extra_path = [d for d in _ninja_path_dirs() if d not in os.environ.get("PATH", "").split(os.pathsep)]
    saved_env = {k: os.environ.get(k) for k in ("PATH", "MAX_JOBS")}
    os.environ.setdefault("MAX_JOBS", "2")
    if extra_path:
        os.environ["PATH"] = os.pathsep.join(extra_path + [os.environ.get("PATH", "")])
    t0 = time.perf_counter()
    try:
        if not cpp_extension.is_ninja_available():
            raise RuntimeError(f"{why}; ninja was not found, so it cannot be compiled on first use: "
                               f"{_TOOLS_HINT}; or {_BUILD_HINT}")
        try:
            # The module's init function is PyInit__C, so the library must be named _C.
            mod = cpp_extension.load(
                name="_C", sources=sources, extra_cflags=cxx, extra_cuda_cflags=nvcc,
                extra_include_paths=[src], build_directory=directory, with_cuda=with_cuda,
                verbose=False,
            )
        except Exception as e:  # compiler/linker errors arrive as RuntimeError with the log
            log = str(e)
            raise RuntimeError(
                f"{why}; compiling it on first use in {directory} failed ({_TOOLS_HINT}; or {_BUILD_HINT}). "
                f"Build log tail:\n{log[-4000:]}") from e
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if not cached:
        print(f"fused_ckpt: compiled the csrc extension in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
    return mod


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
