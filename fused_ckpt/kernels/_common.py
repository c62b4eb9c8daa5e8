"""Launch-side helpers shared by the kernel launchers (no kernels here)."""
from __future__ import annotations

import contextlib
import itertools
import os
import threading

import torch
import triton
from triton.runtime.autotuner import Autotuner

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# FUSED_CKPT_AUTOTUNE=0: every autotuned kernel keeps only the first config that survives its
# pruning, so each kernel variant compiles once instead of once per candidate (correctness runs
# on a GPU, e.g. the GPU tests of benchmarks/gpu_check.sh); benchmarks keep autotuning.
AUTOTUNE = os.environ.get("FUSED_CKPT_AUTOTUNE", "1") != "0"


def autotune_candidates(kept: list) -> list:
    """What an ``early_config_prune`` returns: its survivors, or only the first of them when
    FUSED_CKPT_AUTOTUNE=0."""
    return kept if AUTOTUNE else kept[:1]


def dot_flags(dtype: torch.dtype) -> dict:
    """Constexprs that pin down how ``tl.dot`` multiplies operands of ``dtype``.

    DOT_F32: upcast operands to fp32 before ``tl.dot``. Only under the interpreter for bf16,
        whose ``tl.dot`` on bf16 operands returns garbage in triton 3.9; the products of
        bf16 values are exact in fp32, so results are the bf16 GEMM with fp32 accumulation.
    INPUT_PRECISION: fp32 operands use IEEE fp32 unless the user allowed TF32 for matmuls
        (``tf32_matmul_allowed``), mirroring what cuBLAS does for torch. The interpreter has
        no TF32: always IEEE there.
    """
    dot_f32 = INTERPRET and dtype == torch.bfloat16
    if dtype == torch.float32:
        prec = "tf32" if (not INTERPRET and tf32_matmul_allowed()) else "ieee"
    elif dot_f32:
        prec = "ieee"
    else:
        prec = None
    return {"DOT_F32": dot_f32, "INPUT_PRECISION": prec}


def tf32_matmul_allowed() -> bool:
    """Whether PyTorch currently lets fp32 matmuls on CUDA use TF32 (a pure read of
    ``torch.backends``).

    torch >= 2.9 keeps the setting as ``torch.backends.cuda.matmul.fp32_precision`` ("tf32",
    "ieee", or "none": inherit from ``torch.backends.fp32_precision``); once that API has been
    used (``torch.backends.fp32_precision = "tf32"``, transformers' ``enable_tf32``), reading
    the legacy ``torch.backends.cuda.matmul.allow_tf32`` raises RuntimeError, so the new API is
    read first. Older torch has only the legacy flag."""
    matmul = torch.backends.cuda.matmul
    try:
        prec = matmul.fp32_precision
    except AttributeError:  # torch < 2.9: the legacy flag only
        return bool(matmul.allow_tf32)
    if prec == "none":  # not set for CUDA matmuls: the global setting, then the legacy default
        prec = getattr(torch.backends, "fp32_precision", "none")
    if prec == "none":
        try:
            return bool(matmul.allow_tf32)
        except RuntimeError:  # mixed legacy/new state: nothing asked for TF32
            return False
    return prec == "tf32"


def tl_dtype_ok(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float32, torch.float16, torch.bfloat16)


def check_device(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"the Triton backend needs CUDA tensors ({what} is on {t.device}); set "
            "TRITON_INTERPRET=1 before importing triton to run the kernels on CPU, or use backend='aten'"
        )


# ----------------------------------------------------------------------------- launching
# The Triton interpreter keeps the state of the launch it is running (grid index, patched
# ``tl`` functions) in module globals, so two threads interpreting launches at once corrupt
# each other; interpreted launches take this process-wide lock. Compiled launches do not.
_INTERPRET_LOCK = threading.RLock()


def _kernel_arg_names(kernel) -> list:
    fn = kernel
    while not hasattr(fn, "arg_names") and hasattr(fn, "fn"):  # Autotuner / Heuristics wrappers
        fn = fn.fn
    return list(getattr(fn, "arg_names", ()))


def _kernel_name(kernel) -> str:
    fn = kernel
    while not hasattr(fn, "__name__") and hasattr(fn, "fn"):
        fn = fn.fn
    return getattr(fn, "__name__", type(kernel).__name__)


def _arg_name(kernel, n_args: int, kwargs: dict, i: int) -> str:
    """The name of the i-th argument of ``kernel[grid](*args, **kwargs)`` (n_args positional)."""
    if i >= n_args:
        return list(kwargs)[i - n_args]
    names = _kernel_arg_names(kernel)
    return names[i] if i < len(names) else f"argument {i}"


def launch_device(kernel, args: tuple, kwargs: dict) -> torch.device | None:
    """The device of a launch's tensor arguments (None if it has none). Raises, naming the
    arguments, when they are not all on one device or when that device cannot run Triton
    (``check_device``)."""
    i0 = device = None
    for i, t in enumerate(itertools.chain(args, kwargs.values())):  # one pass: this runs per launch
        if not isinstance(t, torch.Tensor):
            continue
        if device is None:
            i0, device = i, t.device
            if device.type != "cuda":
                check_device(t, f"{_kernel_name(kernel)}'s {_arg_name(kernel, len(args), kwargs, i)}")
        elif t.device != device:
            raise RuntimeError(
                f"{_kernel_name(kernel)}: {_arg_name(kernel, len(args), kwargs, i)} is on {t.device} but "
                f"{_arg_name(kernel, len(args), kwargs, i0)} is on {device}; all tensors of one "
                "launch must be on the same device")
    return device


def device_context(device: torch.device | None):
    """What a launch runs under: ``torch.cuda.device(device)`` for CUDA tensors, so Triton
    compiles for and launches on that device and its current stream rather than the current
    device's (cheap when it is already current); nothing for CPU tensors (interpreter)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``, the only way the launchers start a Triton kernel:
    checks that the tensor arguments share one device (``launch_device``), runs the launch
    under that device (``device_context``) and, under the interpreter, holds the process-wide
    interpreter lock."""
    device = launch_device(kernel, args, kwargs)
    if INTERPRET:
        with _INTERPRET_LOCK, device_context(device):
            return kernel[grid](*args, **kwargs)
    with device_context(device):
        return kernel[grid](*args, **kwargs)


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)


# ----------------------------------------------------------------------------- config pruning
# Budgets behind the autotune pruning below, checked offline with tools/aot_compile.py
# (ptxas -v for sm_90a, triton 3.6 and 3.9): every config the pruning can return, fallbacks
# included, fits shared memory; the printed table has the registers and spills of each.
SMEM_BYTES = 227 * 1024  # H100/H200 opt-in shared memory per block (232,448 B)
ACC_REGS_GEMM = 128  # fp32 accumulator registers per thread for a plain GEMM (128x256 tile, 8 warps)
ACC_REGS_FUSED = 96  # ... for kernels with a transcendental epilogue (activation and its derivative)
# fp32 inputs with IEEE dots (no tensor cores: FMA loops with the operand tiles in registers)
# build without spills only with BLOCK_K = 16 (sm_90, gated FFN backward: BLOCK_K 32 spills
# 8-392 B, 64 spills 3-4 KB); tensor-core dots take BLOCK_K >= 32.
IEEE_BLOCK_K = 16


# (major, minor) of triton: a few budgets differ between the measured versions (3.6 and 3.9)
TRITON_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2])


def size_bucket(n: int) -> int:
    """Autotune key for a size that changes between launches (a token count): the next power
    of two, so variable-length batches and chunk tails reuse one tuning result per octave
    instead of benchmarking every config for every new length."""
    return 1 << max(int(n) - 1, 0).bit_length()


def _elem_size(named_args: dict, name: str) -> int:
    t = named_args.get(name)
    return t.element_size() if hasattr(t, "element_size") else 2


def tile_smem_bytes(cfg, stage_bytes, kw: dict, elem: int) -> int:
    """Shared memory of ``cfg``'s software pipeline: ``num_stages`` copies of the operand
    tiles one k-step loads. What the tensor-core builds allocate; the IEEE fp32 builds keep
    one stage fewer (tools/aot_compile.py compares both with the compiled kernels)."""
    return cfg.num_stages * stage_bytes(cfg.kwargs, kw, elem)


def select_tile_configs(configs: list, acc_tiles, stage_bytes, elem: int, kw: dict,
                        acc_budget: int, what: str = "kernel") -> list:
    """The configs a launch may use, a pure function of the launch's element size and
    constexprs ``kw`` (tested on CPU; no interpreter shortcut here).

    1. Shared memory: only configs within ``SMEM_BYTES`` (``tile_smem_bytes``); none is a
       ValueError naming the variant (a config list that lacks a small tile for it).
    2. Dot path: fp32 with IEEE dots takes only BLOCK_K == IEEE_BLOCK_K, the other paths only
       BLOCK_K > IEEE_BLOCK_K, when the list has such configs.
    3. Registers: fp32 accumulator registers per thread,
       ``acc_tiles(kw) * BLOCK_M * BLOCK_N / (32 * num_warps)``, within ``acc_budget``
       (halved for fp32 operands, whose tiles take registers too). If none is within, the
       one with the fewest (then the least shared memory) among those of steps 1-2: every
       config returned fits shared memory."""
    fits = [c for c in configs if tile_smem_bytes(c, stage_bytes, kw, elem) <= SMEM_BYTES]
    if not fits:
        raise ValueError(f"{what}: no tile config fits in {SMEM_BYTES} B of shared memory for "
                         f"{elem}-byte inputs and {kw}; add a smaller config")
    ieee = elem == 4 and kw.get("INPUT_PRECISION") == "ieee"
    path = [c for c in fits if (c.kwargs["BLOCK_K"] <= IEEE_BLOCK_K) == ieee]
    fits = path or fits
    budget = acc_budget if elem <= 2 else acc_budget // 2
    n_acc = acc_tiles(kw)

    def regs(c):
        return n_acc * c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps)

    kept = [c for c in fits if regs(c) <= budget]
    return kept or [min(fits, key=lambda c: (regs(c), tile_smem_bytes(c, stage_bytes, kw, elem)))]


def resource_pruner(acc_tiles, stage_bytes, ptr_name: str, acc_budget: int):
    """An ``early_config_prune`` over :func:`select_tile_configs`.

    acc_tiles(kw) -> how many BLOCK_M x BLOCK_N fp32 accumulators the kernel holds;
    stage_bytes(cfg_kw, kw, elem) -> bytes of operand tiles loaded per pipeline stage.
    Under the interpreter (one config) nothing is pruned."""

    def prune(configs, named_args, **kwargs):
        if INTERPRET or len(configs) <= 1:
            return configs
        kw = {**{k: v for k, v in named_args.items() if k.isupper()}, **kwargs}
        return autotune_candidates(select_tile_configs(
            configs, acc_tiles, stage_bytes, _elem_size(named_args, ptr_name), kw, acc_budget))

    return prune


class LoneConfigAutotuner(Autotuner):
    """triton's Autotuner, except that a launch whose pruning leaves a single config runs it
    without benchmarking. triton 3.9 skips the benchmark itself then; triton 3.6 benchmarks the
    lone config (do_bench: warm-up and timed launches, and a fresh 256 MiB L2-flush buffer) for
    every new tuning key, which with FUSED_CKPT_AUTOTUNE=0 or a one-config pruning buys
    nothing."""

    _lone = False

    def prune_configs(self, *args, **kwargs):
        pruned = super().prune_configs(*args, **kwargs)
        self._lone = len(pruned) == 1
        return pruned

    def _bench(self, *args, config, **meta):
        if self._lone:  # nothing to compare: the run that follows compiles and launches it
            return [0.0, 0.0, 0.0]
        return super()._bench(*args, config=config, **meta)


def autotune(configs: list, key: list, **kwargs):
    """``triton.autotune`` with :class:`LoneConfigAutotuner` (same arguments)."""

    def decorator(fn):
        tuner = triton.autotune(configs=configs, key=key, **kwargs)(fn)
        tuner.__class__ = LoneConfigAutotuner
        return tuner

    return decorator


def fused_tile_configs() -> list:
    """Candidate tiles for the fused FFN kernels (pruned per launch by ``resource_pruner``).
    The BLOCK_K = 16 tiles serve fp32 inputs with IEEE dots (the only ones those keep); the
    64x64x32 tile on 8 warps is the one that fits fp32 TF32 dots of the gated backward with
    recomputation (3 accumulators) without spills."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
        for bm, bn, bk, s, w in (
            (128, 256, 64, 3, 8),
            (128, 128, 64, 3, 8),
            (128, 128, 64, 4, 8),
            (128, 64, 64, 3, 8),
            (128, 64, 64, 4, 4),
            (64, 128, 64, 3, 8),
            (64, 128, 64, 4, 4),
            (64, 64, 64, 4, 4),
            (64, 64, 32, 5, 4),
            (64, 64, 32, 3, 8),
            (64, 64, 16, 3, 8),
            (64, 32, 16, 3, 4),
        )
    ]
